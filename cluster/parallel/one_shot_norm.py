"""The all-reduce of a row-parallel layer fused with the residual add and RMSNorm after it: one kernel.

In a TP decode step each layer's two all-reduces are followed at once by the next norm, which adds the
reduced sum into the residual stream and normalises it (`fused_add_rms_norm`). Run apart, that is two
kernels on the critical path per all-reduce: the one-shot all-reduce (10.8 us for 512 KiB inside a CUDA
graph on 2xH200) and the add-and-norm (about 2.2 us). Here one program per token row does all of it:

  (1) copy this rank's partial row into its slot of the symmetric buffer (every rank maps every rank's);
  (2) barrier with each peer for this row only: set the flag this rank owns in the peer's flag array
      (0 -> 1, release, system scope; spinning while a previous call's flag is still unconsumed), then
      consume each peer's flag in its own (1 -> 0, acquire). A row waits for the same row of its peers,
      never for another row, so rows never wait on each other and the grid may be any size;
  (3) sum the row over the ranks in rank order in fp32, round it to the model's dtype (what the
      all-reduce returns), then add the residual and normalise with the very functions
      `fused_triton._rms_norm_kernel` uses (`add_rounded`, `rms_norm_row`): bit for bit the unfused pair.

Buffers alternate between two halves per call (one_shot.py (4) says why: a rank that runs ahead may
write its next partial while a slower peer still reads this one); the flags reset themselves, so the
kernel can be captured in a CUDA graph and replayed. `all_reduce_add_rms_norm` launches it; the peers'
buffer and flag addresses come from the symmetric-memory handles as device arrays of pointers.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from cluster.ops.fused_triton import add_rounded, norm_num_warps, rms_norm_row


# `rank` is not specialised: every rank runs one binary (ranks emulated in one process on one GPU would
# otherwise load a second module while the first rank's kernel spins, and module loading waits for it)
@triton.jit(do_not_specialize=["rank"])
def _all_reduce_add_rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, buffers_ptr, flags_ptr,
    rank, num_cols, eps,
    WORLD: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < num_cols
    dtype = x_ptr.dtype.element_ty
    # (1) this rank's partial into its own slot
    x = tl.load(x_ptr + row * num_cols + cols, mask=mask, other=0.0)
    mine = tl.load(buffers_ptr + rank).to(tl.pointer_type(dtype))
    tl.store(mine + row * num_cols + cols, x, mask=mask)
    res = tl.load(res_ptr + row * num_cols + cols, mask=mask, other=0.0)  # (read while the peers catch up)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    tl.debug_barrier()  # every thread's part of the row is written before the flag says so
    # (2) flags: [row, from rank] in each rank's array
    for peer in tl.static_range(WORLD):
        if peer != rank:
            theirs = tl.load(flags_ptr + peer).to(tl.pointer_type(tl.int32))
            while tl.atomic_cas(theirs + row * WORLD + rank, 0, 1, sem="release", scope="sys") != 0:
                pass
    own = tl.load(flags_ptr + rank).to(tl.pointer_type(tl.int32))
    for peer in tl.static_range(WORLD):
        if peer != rank:
            while tl.atomic_cas(own + row * WORLD + peer, 1, 0, sem="acquire", scope="sys") != 1:
                pass
    tl.debug_barrier()  # no thread reads a peer's row before its flag was seen
    # (3) the sum in rank order, then the add and the norm as the unfused kernels round them
    # (this rank's own row from registers, not read back; every rank sums in the same order)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for r in tl.static_range(WORLD):
        slot = tl.load(buffers_ptr + r).to(tl.pointer_type(dtype))
        remote = (cols * 0 + r) != rank
        theirs = tl.load(slot + row * num_cols + cols, mask=mask & remote, other=0.0, volatile=True)
        acc += tl.where(remote, theirs, x).to(tl.float32)
    added = add_rounded(acc.to(dtype), res)
    tl.store(res_out_ptr + row * num_cols + cols, added, mask=mask)
    out = rms_norm_row(added, w, num_cols, eps)
    tl.store(out_ptr + row * num_cols + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def all_reduce_add_rms_norm(partial: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                            buffers: torch.Tensor, flags: torch.Tensor, rank: int, world: int,
                            num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(sum over ranks of `partial` + residual), that sum + residual) for `partial` and `residual`
    [rows, hidden] (contiguous, one dtype). `buffers` and `flags`: int64 device arrays of every rank's
    buffer half (at least rows x hidden of the dtype) and flag array (at least rows x world int32, zero
    between calls), in rank order. Every rank calls it with the same shapes, in the same order.
    `num_warps`: a program's warps (default by the row's width; bench.fused_norm compares others)."""
    rows, num_cols = partial.shape
    out = torch.empty(partial.shape, dtype=torch.promote_types(partial.dtype, weight.dtype), device=partial.device)
    res_out = torch.empty_like(partial)
    if rows:
        block = triton.next_power_of_2(num_cols)
        _all_reduce_add_rms_norm_kernel[(rows,)](
            partial, residual, weight, out, res_out, buffers, flags, rank, num_cols, eps,
            WORLD=world, BLOCK=block, num_warps=num_warps or norm_num_warps(block))
    return out, res_out
