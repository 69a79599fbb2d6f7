"""Sparse mixture-of-experts MLP (Mixtral, Qwen2-MoE, Qwen3-MoE).

  (1) the router scores every token against every expert (softmax over experts);
  (2) each token keeps its top-k experts, weights renormalised if the model says so;
  (3) tokens are grouped by expert and each expert runs its gated MLP on its group
      (one grouped GEMM on GPUs that have it, else a loop over experts);
  (4) outputs are scattered back, weighted, and summed per token;
  (5) Qwen2-MoE adds a shared expert scaled by sigmoid(shared_expert_gate(x)).

Expert weights are stacked ([num_local_experts, 2*I, H] and [.., H, I]). Two ways to
spread them over the tensor-parallel ranks:
  - tensor parallel (default): every rank holds every expert, 1/tp of its intermediate
    dim; partial sums (experts + shared expert) meet in one all-reduce;
  - expert parallel (ep == tp): rank r holds experts [r*E/ep, (r+1)*E/ep) whole; tokens
    are dispatched and combined by all-to-all (parallel/experts.py); the shared expert
    is replicated and runs on the rank's token slice.
Per-expert token counts are kept in `tokens_per_expert` for load statistics (summed
over ranks they count each routed token once). A CUDA graph runs padded rows too; while it
is captured, `row_mask` points at its buffer of 1 (a real row) or 0 (padding), and only
real rows are counted.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cluster.models.layers import GatedMLP
from cluster.parallel.experts import AllToAllDispatcher, combine_topk, expert_counts, expert_mlp
from cluster.parallel.handles import TPGroup
from cluster.parallel.linear import ReplicatedLinear, copy_checked, narrow
from cluster.parallel.overlap import NO_OVERLAP, OverlapFlags, all_reduce_steps, run_sync


class StackedExperts(nn.Module):
    """The experts of one layer: rank r of `ep` holds a contiguous slice of them, each
    split over `tp` along its intermediate dim (one of the two groups has size 1)."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, ep: TPGroup, tp: TPGroup | None = None):
        super().__init__()
        tp = tp or TPGroup.single()
        if num_experts % ep.size:
            raise ValueError(f"num_experts={num_experts} is not divisible by expert parallel size {ep.size}")
        if intermediate % tp.size:
            raise ValueError(f"moe_intermediate_size={intermediate} is not divisible by tensor parallel size {tp.size}")
        self.ep, self.tp = ep, tp
        self.num_experts = num_experts
        self.num_local = num_experts // ep.size
        self.first_expert = ep.rank * self.num_local
        self.intermediate = intermediate // tp.size  # this rank's share of each expert
        self.w13 = nn.Parameter(torch.empty(self.num_local, 2 * self.intermediate, hidden), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(self.num_local, hidden, self.intermediate), requires_grad=False)
        self.w13.weight_loader = self._load_w13
        self.w2.weight_loader = self._load_w2
        self.counts_load = tp.rank == 0  # tp ranks all see the same tokens: one of them counts
        self.register_buffer("tokens_per_expert", torch.zeros(num_experts, dtype=torch.int64), persistent=False)
        self.row_mask: torch.Tensor | None = None  # int64 [T], set only while a CUDA graph is captured

    def owns(self, expert_id: int) -> bool:
        return self.first_expert <= expert_id < self.first_expert + self.num_local

    def _load_w13(self, param, source, shard_id) -> None:
        expert_id, half = shard_id  # half 0: gate (w1), 1: up (w3); source [I, H]
        size = self.intermediate
        dst = param.data[expert_id - self.first_expert].narrow(0, half * size, size)
        copy_checked(dst, narrow(source, 0, self.tp.rank * size, size))

    def _load_w2(self, param, source, shard_id) -> None:
        size = self.intermediate  # source [H, I]
        copy_checked(param.data[shard_id - self.first_expert], narrow(source, 1, self.tp.rank * size, size))

    def record_load(self, local_counts: torch.Tensor) -> None:
        if self.counts_load:
            self.tokens_per_expert[self.first_expert : self.first_expert + self.num_local] += local_counts

    def run(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Rows grouped by local expert (counts[e] each) -> their expert outputs."""
        return expert_mlp(rows, counts, self.w13, self.w2)

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """Every expert local: x [T, H], topk_* [T, k] -> sum of weighted expert outputs [T, H]
        (a partial sum when the experts are tp-split)."""
        flat_ids = topk_ids.flatten()
        order = torch.argsort(flat_ids, stable=True)
        counts = expert_counts(flat_ids, self.num_experts)
        if self.row_mask is None:
            self.record_load(counts)
        else:
            # expand, not repeat_interleave: that one reads its output size on the host, which a capture refuses
            pair_mask = self.row_mask.unsqueeze(1).expand(-1, topk_ids.shape[1]).reshape(-1)
            self.record_load(expert_counts(flat_ids, self.num_experts, pair_mask))
        y = self.run(x[order // topk_ids.shape[1]], counts)
        return combine_topk(y, order, topk_weights)


class SparseMoE(nn.Module):
    def __init__(self, cfg, tp: TPGroup, ep: TPGroup):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.norm_topk_prob = cfg.norm_topk_prob
        expert_parallel = ep.size > 1
        if expert_parallel and (ep.size != tp.size or ep.rank != tp.rank):
            raise ValueError(f"expert parallelism spreads experts over the tensor-parallel ranks: ep={ep.size} must equal tp={tp.size}")
        self.tp = tp
        shard = TPGroup.single() if expert_parallel else tp
        self.gate = ReplicatedLinear(cfg.hidden_size, cfg.num_experts)
        self.experts = StackedExperts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size,
                                      ep if expert_parallel else TPGroup.single(), shard)
        self.dispatcher = AllToAllDispatcher(ep, cfg.num_experts) if expert_parallel else None
        self.shared_expert = None
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = GatedMLP(cfg.hidden_size, cfg.shared_expert_intermediate_size, shard, reduce_results=False)
            self.shared_expert_gate = ReplicatedLinear(cfg.hidden_size, 1)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float)
        topk_weights, topk_ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
        return topk_weights.to(x.dtype), topk_ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dispatcher is not None:
            return run_sync(self.steps(x, NO_OVERLAP))
        return self.tp.all_reduce(self._partial(x))

    def _partial(self, x: torch.Tensor) -> torch.Tensor:
        topk_weights, topk_ids = self.route(x)
        out = self.experts(x, topk_ids, topk_weights)
        if self.shared_expert is not None:
            # tp-split: its partial sums join the experts' partial sums in one all-reduce
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out

    def steps(self, x: torch.Tensor, overlap: OverlapFlags):
        """`forward` as a generator that yields while each collective is in flight."""
        if self.dispatcher is None:
            return (yield from all_reduce_steps(self.tp, self._partial(x), overlap.tp))
        lo, hi, _ = self.dispatcher.token_slice(x.shape[0])
        mine = x[lo:hi]
        topk_weights, topk_ids = self.route(mine)
        sent = yield from self.dispatcher.dispatch(mine, topk_ids, overlap.ep)
        self.experts.record_load(sent.counts)
        y = self.experts.run(sent.rows, sent.counts)
        out = yield from self.dispatcher.combine(y, sent, topk_weights, overlap.ep)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(mine)) * self.shared_expert(mine)
        return (yield from self.dispatcher.gather(out, x.shape[0], overlap.ep))
