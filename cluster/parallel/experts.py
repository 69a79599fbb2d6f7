"""Expert parallelism: routed tokens travel to the rank holding their expert and back.

Each of the `ep` ranks holds num_experts/ep whole experts (a contiguous slice).
Activations enter an MoE layer replicated on every rank (after attention's all-reduce):

  (1) rank r keeps its slice of the tokens, rows [r*n, (r+1)*n) with n = ceil(T/ep),
      and routes them (top-k experts each);
  (2) its (token, expert) pairs are sorted by expert, so the rows bound for rank d
      form one run; per-expert counts go first (an all-to-all of ep*E_local ints)
      so every rank knows how many rows it gets from whom, for which of its experts;
  (3) dispatch: all-to-all of the rows;
  (4) received rows (grouped by source, then expert) are regrouped by expert and run
      through the local experts in one grouped GEMM;
  (5) combine: the reverse all-to-all returns each row to the rank it came from,
      which weights and sums each token's top-k rows;
  (6) an all-gather of the slices makes the activations replicated again.

    sent by rank 0 (E_local = 2):  [to r0: e0 e0 e1 | to r1: e2 e3 e3]
    received by rank 1:            [from r0: e2 e3 e3 | from r1: e2 e2 e3]
    regrouped:                     [e2 e2 e2 | e3 e3 e3]

Every collective is a yield point (see overlap.py), so another micro-batch computes
while it is in flight. Counts of received rows per local expert feed load statistics.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cluster.parallel.handles import TPGroup


def expert_counts(flat_ids: torch.Tensor, num_experts: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """int64 [num_experts]: how many rows go to each expert (no host sync, unlike bincount on CUDA);
    with `weights` (int64, one per row), the sum of the rows' weights instead."""
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat_ids.device)
    return counts.scatter_add_(0, flat_ids, torch.ones_like(flat_ids) if weights is None else weights)


def combine_topk(y: torch.Tensor, order: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """Expert outputs of the (token, k) pairs in sorted order (pair order[i] is row i of y) ->
    each token's weighted sum over its k experts [T, H].

    The sum runs over k in a fixed order, not by atomic adds (index_add_ on CUDA): a token's output
    then depends on its own rows only, bit for bit, whatever other rows share the step (the padded
    rows of a CUDA-graph bucket, another batch composition).
    """
    num_tokens, top_k = topk_weights.shape
    pairs = torch.empty_like(y).index_copy_(0, order, y)  # order is a permutation of the pairs
    return (pairs.view(num_tokens, top_k, y.shape[-1]) * topk_weights.to(y.dtype).unsqueeze(-1)).sum(1)


def grouped_mm_available(x: torch.Tensor) -> bool:
    """torch._grouped_mm runs bf16 on Hopper-class GPUs and newer."""
    return grouped_mm_runs(x.device, x.dtype)


def grouped_mm_runs(device: torch.device, dtype: torch.dtype) -> bool:
    if not (device.type == "cuda" and dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")):
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9


def expert_mlp(rows: torch.Tensor, counts: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
               grouped: bool | None = None) -> torch.Tensor:
    """Rows sorted by expert, counts[e] of them for expert e -> down(silu(gate) * up) per row.

    w13 [E, 2*I, H] (gate | up), w2 [E, H, I]. The grouped GEMM path runs all experts in
    two kernels with no host sync (CUDA-graph capturable); the loop is the reference.
    """
    if grouped is None:
        grouped = grouped_mm_available(rows)
    if rows.shape[0] == 0:  # an expert-parallel rank may receive nothing
        return rows.new_empty((0, w2.shape[1]))
    if grouped:
        offsets = counts.cumsum(0).to(torch.int32)
        gate, up = torch._grouped_mm(rows, w13.transpose(1, 2), offs=offsets).chunk(2, dim=-1)
        return torch._grouped_mm(F.silu(gate) * up, w2.transpose(1, 2), offs=offsets)
    out = rows.new_empty((rows.shape[0], w2.shape[1]))
    start = 0
    for expert, count in enumerate(counts.tolist()):
        if count:
            gate, up = F.linear(rows[start : start + count], w13[expert]).chunk(2, dim=-1)
            out[start : start + count] = F.linear(F.silu(gate) * up, w2[expert])
            start += count
    return out


@dataclass
class Dispatched:
    """Rows this rank received, regrouped by local expert, and how to send them back."""

    rows: torch.Tensor  # [num_received, H], grouped by local expert
    counts: torch.Tensor  # int64 [E_local]: rows per local expert
    regroup: torch.Tensor  # grouped row i is received row regroup[i]
    send_splits: list[int]  # rows this rank sent to each rank
    recv_splits: list[int]  # rows it received from each rank
    order: torch.Tensor  # sorted (token, k) pair i is flat pair order[i] of this rank's slice


class AllToAllDispatcher:
    def __init__(self, ep: TPGroup, num_experts: int):
        self.ep = ep
        self.num_experts = num_experts
        self.num_local = num_experts // ep.size

    def token_slice(self, num_tokens: int) -> tuple[int, int, int]:
        """(lo, hi, rows per rank): this rank's share of the replicated tokens."""
        per_rank = -(-num_tokens // self.ep.size)
        lo = min(num_tokens, self.ep.rank * per_rank)
        return lo, min(num_tokens, lo + per_rank), per_rank

    def dispatch(self, x: torch.Tensor, topk_ids: torch.Tensor, overlap: bool):
        """Generator, steps (2)-(4): x [t, H] this rank's tokens -> Dispatched."""
        top_k, ep, num_local = topk_ids.shape[1], self.ep.size, self.num_local
        flat = topk_ids.flatten()
        order = torch.argsort(flat, stable=True)
        send_rows = x[order // top_k]
        counts = expert_counts(flat, self.num_experts)
        pending = self.ep.all_to_all_async(counts, [num_local] * ep, [num_local] * ep)
        if overlap:
            yield
        recv_counts = pending.wait()  # [ep * E_local]: from rank s, for local expert j, at s*E_local + j
        host = torch.cat([counts, recv_counts]).tolist()
        send_splits = [sum(host[d * num_local : (d + 1) * num_local]) for d in range(ep)]
        recv_host = host[self.num_experts :]
        recv_splits = [sum(recv_host[s * num_local : (s + 1) * num_local]) for s in range(ep)]
        pending = self.ep.all_to_all_async(send_rows, send_splits, recv_splits)
        if overlap:
            yield
        rows = pending.wait()
        local_ids = torch.arange(num_local, device=x.device).repeat(ep)
        expert_of_row = torch.repeat_interleave(local_ids, recv_counts, output_size=sum(recv_splits))
        regroup = torch.argsort(expert_of_row, stable=True)
        return Dispatched(rows[regroup], recv_counts.view(ep, num_local).sum(0), regroup, send_splits, recv_splits, order)

    def combine(self, y: torch.Tensor, sent: Dispatched, topk_weights: torch.Tensor, overlap: bool):
        """Generator, step (5): expert outputs (grouped like `sent.rows`) -> this rank's tokens [t, H]."""
        received_order = torch.empty_like(y)
        received_order[sent.regroup] = y
        pending = self.ep.all_to_all_async(received_order, sent.recv_splits, sent.send_splits)
        if overlap:
            yield
        back = pending.wait()  # in `sent.order` order
        return combine_topk(back, sent.order, topk_weights)

    def gather(self, mine: torch.Tensor, num_tokens: int, overlap: bool):
        """Generator, step (6): every rank's slice -> the replicated [num_tokens, H]."""
        _, _, per_rank = self.token_slice(num_tokens)
        if mine.shape[0] < per_rank:
            mine = torch.cat([mine, mine.new_zeros((per_rank - mine.shape[0], mine.shape[1]))])
        pending = self.ep.all_gather_rows_async(mine)
        if overlap:
            yield
        return pending.wait()[:num_tokens]
