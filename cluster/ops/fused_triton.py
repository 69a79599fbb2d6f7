"""Triton kernels behind `cluster.ops.fused`: RMSNorm (+ residual add), rotary, SiLU-and-mul.

Imported only on first use (by `fused` when a tensor is on CUDA, or by the tests
under TRITON_INTERPRET=1), because triton is optional and `@triton.jit` picks
interpreted or compiled functions when this module is imported.

Every launcher is CUDA-graph capturable: grids and block sizes come from tensor
shapes, nothing reads a tensor value on the host, outputs are allocated with
`torch.empty` (from the graph's pool while capturing).

  rms_norm_triton(x, weight, eps, residual=None) -> normed | (normed, x + residual)
      one program per row (token, or token x head for q/k norms [T, H, D])
  rotary_triton_(q, k, positions, cos_cache, sin_cache)   in place
      one program per token, all q and k heads of it
  silu_and_mul_triton(gate_up) -> silu(gate) * up
      one program per (token, BLOCK_SILU columns)
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_SILU = 1024


@triton.jit
def add_rounded(x, r):
    """x + r added in fp32 and rounded once to x's dtype, as torch does for a half-precision `x + r`."""
    return (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)


@triton.jit
def rms_norm_row(x, w, num_cols, eps):
    """RMSNorm of the row `x` times `w`, in fp32 (the caller rounds it): as HF, `weight * x.to(dtype)`,
    the normalised value rounded to x's dtype first. The plain kernel below and the all-reduce-fused
    one (parallel/one_shot_norm.py) share it, so their results agree bit for bit."""
    xf = x.to(tl.float32)
    mean_sq = tl.sum(xf * xf, axis=0) / num_cols
    normed = (xf * tl.rsqrt(mean_sq + eps)).to(x.dtype)
    return w.to(tl.float32) * normed.to(tl.float32)


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    stride_x_t, stride_x_h, stride_r_t, stride_o_t, stride_o_h, stride_ro_t,
    num_cols, eps,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < num_cols
    x = tl.load(x_ptr + token * stride_x_t + head * stride_x_h + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + token * stride_r_t + cols, mask=mask, other=0.0)
        x = add_rounded(x, r)
        tl.store(res_out_ptr + token * stride_ro_t + cols, x, mask=mask)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    out = rms_norm_row(x, w, num_cols, eps)
    tl.store(out_ptr + token * stride_o_t + head * stride_o_h + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotate_heads(base_ptr, stride_h, num_heads, cos1, cos2, sin1, sin2,
                  HALF: tl.constexpr, HALF_P2: tl.constexpr, HEADS_P2: tl.constexpr):
    """Neox rotation of one token's heads in place; cos/sin [HALF_P2] fp32 for each half."""
    h = tl.arange(0, HEADS_P2)[:, None]
    d = tl.arange(0, HALF_P2)[None, :]
    mask = (h < num_heads) & (d < HALF)
    ptr1 = base_ptr + h * stride_h + d
    x1 = tl.load(ptr1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr1 + HALF, mask=mask, other=0.0).to(tl.float32)
    # x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1)
    out1 = x1 * cos1[None, :] - x2 * sin1[None, :]
    out2 = x2 * cos2[None, :] + x1 * sin2[None, :]
    tl.store(ptr1, out1.to(base_ptr.dtype.element_ty), mask=mask)
    tl.store(ptr1 + HALF, out2.to(base_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, pos_ptr, cos_ptr, sin_ptr,
    stride_q_t, stride_q_h, stride_k_t, stride_k_h, stride_cos, stride_sin,
    num_q_heads, num_k_heads,
    HALF: tl.constexpr, HALF_P2: tl.constexpr, Q_HEADS_P2: tl.constexpr, K_HEADS_P2: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + token).to(tl.int64)
    d = tl.arange(0, HALF_P2)
    d_mask = d < HALF
    # Both halves of the table are read (not assumed equal), as the reference multiplies by all of it.
    cos1 = tl.load(cos_ptr + pos * stride_cos + d, mask=d_mask, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_ptr + pos * stride_cos + HALF + d, mask=d_mask, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_ptr + pos * stride_sin + d, mask=d_mask, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_ptr + pos * stride_sin + HALF + d, mask=d_mask, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr + token * stride_q_t, stride_q_h, num_q_heads, cos1, cos2, sin1, sin2,
                  HALF, HALF_P2, Q_HEADS_P2)
    _rotate_heads(k_ptr + token * stride_k_t, stride_k_h, num_k_heads, cos1, cos2, sin1, sin2,
                  HALF, HALF_P2, K_HEADS_P2)


@triton.jit
def _silu_and_mul_kernel(gu_ptr, out_ptr, stride_gu_t, stride_o_t, num_cols, BLOCK: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < num_cols
    gate = tl.load(gu_ptr + token * stride_gu_t + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gu_ptr + token * stride_gu_t + num_cols + cols, mask=mask, other=0.0)
    # F.silu rounds to the input dtype before the product, as here.
    act = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty)
    out = act.to(tl.float32) * up.to(tl.float32)
    tl.store(out_ptr + token * stride_o_t + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def norm_num_warps(block: int) -> int:
    return 1 if block <= 256 else 4 if block <= 2048 else 8 if block <= 8192 else 16


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float,
                    residual: torch.Tensor | None = None):
    """RMSNorm over the last dim of x [T, D] or [T, H, D] (e.g. strided q/k views).

    With `residual` (x [T, D] only): normalises x + residual and returns (normed, x + residual).
    """
    num_cols = x.shape[-1]
    if weight.shape != (num_cols,):
        raise ValueError(f"weight shape {tuple(weight.shape)} != ({num_cols},)")
    if x.dim() == 2:
        x3 = x[:, None, :]
    elif x.dim() == 3 and residual is None:
        x3 = x
    else:
        raise ValueError(f"x must be [T, D] (or [T, H, D] without residual), got {tuple(x.shape)}")
    if x3.stride(-1) != 1:
        x3 = x3.contiguous()
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    out3 = out.view(x3.shape)
    res_out = None
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(f"residual {tuple(residual.shape)} {residual.dtype} must match x "
                             f"{tuple(x.shape)} {x.dtype}")
        if residual.stride(-1) != 1:
            residual = residual.contiguous()
        res_out = torch.empty_like(x, memory_format=torch.contiguous_format)
    num_tokens, num_heads = x3.shape[0], x3.shape[1]
    if num_tokens * num_heads > 0:
        block = triton.next_power_of_2(num_cols)
        _rms_norm_kernel[(num_tokens, num_heads)](
            x3, residual if residual is not None else x3, weight.contiguous(), out3,
            res_out if res_out is not None else out3,
            x3.stride(0), x3.stride(1),
            residual.stride(0) if residual is not None else 0,
            out3.stride(0), out3.stride(1),
            res_out.stride(0) if res_out is not None else 0,
            num_cols, eps,
            HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=norm_num_warps(block),
        )
    return out if residual is None else (out, res_out)


def rotary_triton_(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                   cos_cache: torch.Tensor, sin_cache: torch.Tensor) -> None:
    """Rotate q [T, Hq, D] and k [T, Hk, D] in place (any token/head strides, unit last stride)."""
    num_tokens, num_q_heads, head_dim = q.shape
    if k.dim() != 3 or k.shape[0] != num_tokens or k.shape[2] != head_dim or k.dtype != q.dtype:
        raise ValueError(f"k {tuple(k.shape)} {k.dtype} does not match q {tuple(q.shape)} {q.dtype}")
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("rotary_triton_ rotates in place: q and k need a unit stride in the last dim")
    if head_dim % 2 or cos_cache.shape[-1] != head_dim or sin_cache.shape[-1] != head_dim:
        raise ValueError(f"head_dim {head_dim} must be even and match the cos/sin tables "
                         f"{tuple(cos_cache.shape)}/{tuple(sin_cache.shape)}")
    if cos_cache.stride(-1) != 1 or sin_cache.stride(-1) != 1 or positions.shape != (num_tokens,):
        raise ValueError("cos/sin tables need a unit last stride and positions must be [T]")
    if num_tokens == 0:
        return
    half = head_dim // 2
    positions = positions.contiguous()
    _rotary_kernel[(num_tokens,)](
        q, k, positions, cos_cache, sin_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_cache.stride(0), sin_cache.stride(0),
        num_q_heads, k.shape[1],
        HALF=half, HALF_P2=triton.next_power_of_2(half),
        Q_HEADS_P2=triton.next_power_of_2(num_q_heads), K_HEADS_P2=triton.next_power_of_2(k.shape[1]),
        num_warps=4,
    )


def silu_and_mul_triton(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2I] (gate first) -> silu(gate) * up [T, I]."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise ValueError(f"gate_up must be [T, 2I], got {tuple(gate_up.shape)}")
    if gate_up.stride(-1) != 1:
        gate_up = gate_up.contiguous()
    num_tokens, num_cols = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty((num_tokens, num_cols), dtype=gate_up.dtype, device=gate_up.device)
    if num_tokens > 0 and num_cols > 0:
        _silu_and_mul_kernel[(num_tokens, triton.cdiv(num_cols, BLOCK_SILU))](
            gate_up, out, gate_up.stride(0), out.stride(0), num_cols, BLOCK=BLOCK_SILU, num_warps=4)
    return out
