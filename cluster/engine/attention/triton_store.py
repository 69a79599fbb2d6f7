"""Triton KV store: this step's K/V into their paged slots, and the argument checks both kernels share.

One program per token writes all of the token's KV heads; a slot < 0 (padding in a
captured CUDA graph) returns at once, so no host sync is ever needed.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_k_t, stride_k_h, stride_v_t, stride_v_h,
    stride_kc_blk, stride_kc_tok, stride_kc_h,
    stride_vc_blk, stride_vc_tok, stride_vc_h,
    num_kv_heads, block_size,
    HEADS_P2: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot < 0:  # padding: nothing to write
        return
    block = slot // block_size
    offset = slot % block_size
    h = tl.arange(0, HEADS_P2)[:, None]
    d = tl.arange(0, HEAD_DIM)[None, :]
    mask = h < num_kv_heads
    k = tl.load(k_ptr + token * stride_k_t + h * stride_k_h + d, mask=mask)
    v = tl.load(v_ptr + token * stride_v_t + h * stride_v_h + d, mask=mask)
    k_dst = k_cache_ptr + block * stride_kc_blk + offset * stride_kc_tok + h * stride_kc_h + d
    v_dst = v_cache_ptr + block * stride_vc_blk + offset * stride_vc_tok + h * stride_vc_h + d
    tl.store(k_dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    """Write k/v [num_tokens, num_kv_heads, head_dim] at `slot_mapping` (slots < 0 skipped)."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    _check_head_dim(head_dim)
    _check_cache(k_cache, v_cache, num_kv_heads, head_dim)
    k, v = _last_dim_contiguous(k), _last_dim_contiguous(v)
    _store_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        num_kv_heads, k_cache.shape[1],
        HEADS_P2=triton.next_power_of_2(num_kv_heads), HEAD_DIM=head_dim,
    )


def _check_head_dim(head_dim: int) -> None:
    if head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
        raise ValueError(f"triton attention needs head_dim a power of two in [16, 256], got {head_dim}")


def _check_cache(k_cache, v_cache, num_kv_heads: int, head_dim: int) -> None:
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.dim() != 4 or tuple(cache.shape[2:]) != (num_kv_heads, head_dim):
            raise ValueError(f"{name} must be [num_blocks, block_size, {num_kv_heads}, {head_dim}], "
                             f"got {tuple(cache.shape)}")
        if cache.stride(3) != 1:
            raise ValueError(f"{name} needs a contiguous head_dim (stride 1), got strides {cache.stride()}")


def _check_attention_args(q, k_cache, v_cache, out, num_kv_heads: int) -> None:
    num_heads, head_dim = q.shape[1], q.shape[2]
    _check_head_dim(head_dim)
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    if not (q.dtype == k_cache.dtype == v_cache.dtype == out.dtype):
        raise ValueError(f"q/k_cache/v_cache/out dtypes differ: {q.dtype}, {k_cache.dtype}, "
                         f"{v_cache.dtype}, {out.dtype}")
    _check_cache(k_cache, v_cache, num_kv_heads, head_dim)
    if out.stride(2) != 1:
        raise ValueError(f"out needs a contiguous head_dim, got strides {out.stride()}")


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()
