"""The Triton copy of whole KV blocks as 8-byte words (kv_blocks.py says why and when it runs)."""
import torch
import triton
import triton.language as tl

CHUNK_WORDS = 1024  # 8-byte words one program copies: 8 KiB


@triton.jit(do_not_specialize=["num_selected", "src_plane_stride", "dst_plane_stride", "words"])
def _copy_blocks_kernel(src_ptr, dst_ptr, index_ptr, num_selected, src_plane_stride, dst_plane_stride, words,
                        SCATTER: tl.constexpr, CHUNK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # plane * num_selected + j
    plane = pid // num_selected
    j = pid % num_selected
    block = tl.load(index_ptr + j).to(tl.int64)
    offs = tl.program_id(1).to(tl.int64) * CHUNK + tl.arange(0, CHUNK)
    mask = offs < words
    if SCATTER:  # packed block j -> cache block `block`
        src = src_ptr + plane * src_plane_stride + j * words
        dst = dst_ptr + plane * dst_plane_stride + block * words
    else:  # cache block `block` -> packed block j
        src = src_ptr + plane * src_plane_stride + block * words
        dst = dst_ptr + plane * dst_plane_stride + j * words
    tl.store(dst + offs, tl.load(src + offs, mask=mask), mask=mask)


def copy_blocks(src: torch.Tensor, dst: torch.Tensor, index: torch.Tensor, scatter: bool) -> None:
    """Between [planes, blocks, words] int64 views: `src`'s blocks `index` into `dst`'s packed ones
    (gather), or `src`'s packed blocks into `dst`'s blocks `index` (scatter)."""
    planes, words = src.shape[0], src.shape[-1]
    if planes == 0 or index.numel() == 0 or words == 0:
        return
    grid = (planes * index.numel(), triton.cdiv(words, CHUNK_WORDS))
    _copy_blocks_kernel[grid](src, dst, index, index.numel(), src.stride(0), dst.stride(0), words,
                              SCATTER=scatter, CHUNK=CHUNK_WORDS)
