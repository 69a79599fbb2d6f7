"""Sparse mixture-of-experts MLP (Mixtral, Qwen2-MoE, Qwen3-MoE).

  (1) the router scores every token against every expert (softmax over experts);
  (2) each token keeps its top-k experts, weights renormalised if the model says so;
  (3) tokens are grouped by expert and each expert runs its gated MLP on its group;
  (4) outputs are scattered back, weighted, and summed per token;
  (5) Qwen2-MoE adds a shared expert scaled by sigmoid(shared_expert_gate(x)).

Expert weights are stacked ([num_local_experts, 2*I, H] and [.., H, I]) so a
rank can hold a slice of the experts (expert parallelism) and a grouped GEMM
can run them in one kernel; per-expert token counts are kept for load stats.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cluster.models.layers import GatedMLP
from cluster.parallel.groups import TPGroup
from cluster.parallel.linear import ReplicatedLinear, copy_checked, materialise


class StackedExperts(nn.Module):
    """The experts of one layer, as two stacked weights; rank r of `ep` holds a contiguous slice."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, ep: TPGroup):
        super().__init__()
        if num_experts % ep.size:
            raise ValueError(f"num_experts={num_experts} is not divisible by expert parallel size {ep.size}")
        self.ep = ep
        self.num_experts = num_experts
        self.num_local = num_experts // ep.size
        self.first_expert = ep.rank * self.num_local
        self.intermediate = intermediate
        self.w13 = nn.Parameter(torch.empty(self.num_local, 2 * intermediate, hidden), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(self.num_local, hidden, intermediate), requires_grad=False)
        self.w13.weight_loader = self._load_w13
        self.w2.weight_loader = self._load_w2
        self.register_buffer("tokens_per_expert", torch.zeros(num_experts, dtype=torch.int64), persistent=False)

    def owns(self, expert_id: int) -> bool:
        return self.first_expert <= expert_id < self.first_expert + self.num_local

    def _load_w13(self, param, source, shard_id) -> None:
        expert_id, half = shard_id  # half 0: gate (w1), 1: up (w3)
        local = expert_id - self.first_expert
        copy_checked(param.data[local].narrow(0, half * self.intermediate, self.intermediate), materialise(source))

    def _load_w2(self, param, source, shard_id) -> None:
        copy_checked(param.data[shard_id - self.first_expert], materialise(source))

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """x [T, H]; topk_* [T, k] over global expert ids -> partial sum over local experts [T, H]."""
        flat_ids = topk_ids.flatten()
        self.tokens_per_expert += torch.bincount(flat_ids, minlength=self.num_experts)
        order = torch.argsort(flat_ids, stable=True)
        token_of = order // topk_ids.shape[1]
        counts = torch.bincount(flat_ids, minlength=self.num_experts)[self.first_expert : self.first_expert + self.num_local]
        start = int((flat_ids < self.first_expert).sum())
        out = torch.zeros_like(x)
        for local, count in enumerate(counts.tolist()):
            if count == 0:
                continue
            rows = order[start : start + count]
            tokens = token_of[start : start + count]
            start += count
            gate, up = F.linear(x[tokens], self.w13[local]).chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.w2[local])
            out.index_add_(0, tokens, y * topk_weights.flatten()[rows, None].to(y.dtype))
        return out


class SparseMoE(nn.Module):
    def __init__(self, cfg, tp: TPGroup, ep: TPGroup):
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.norm_topk_prob = cfg.norm_topk_prob
        if tp.size > 1 and ep.size != tp.size:
            raise ValueError(f"MoE layers need expert parallel size == tensor parallel size (got ep={ep.size}, tp={tp.size})")
        self.tp = tp
        self.gate = ReplicatedLinear(cfg.hidden_size, cfg.num_experts)
        self.experts = StackedExperts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, ep)
        self.shared_expert = None
        if cfg.shared_expert_intermediate_size:
            self.shared_expert = GatedMLP(cfg.hidden_size, cfg.shared_expert_intermediate_size, tp, reduce_results=False)
            self.shared_expert_gate = ReplicatedLinear(cfg.hidden_size, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        router_logits = self.gate(x)
        probs = F.softmax(router_logits, dim=-1, dtype=torch.float)
        topk_weights, topk_ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
        out = self.experts(x, topk_ids, topk_weights.to(x.dtype))
        if self.shared_expert is not None:
            # TP-sharded: its partial sums join the experts' partial sums in one all-reduce.
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return self.tp.all_reduce(out)
