"""The decoder every supported architecture shares (Llama, Mistral, Qwen2/3 and their MoE forms).

  forward(input_ids, positions, attn) -> hidden  [num_tokens, hidden]
  compute_logits(hidden[logits_indices]) -> logits [n, vocab]
  forward_microbatches([...], overlap) -> [hidden, ...]  two or more micro-batches taking
      turns so one's collectives overlap another's compute (parallel/overlap.py)

`attn` carries the attention backend, this step's metadata and the per-layer
KV caches (see `cluster.engine.attention.base`); the model does not know
whether it runs in a prefill, decode or mixed instance.
"""
from __future__ import annotations

import torch
from torch import nn

from cluster.models.hf_config import ArchConfig
from cluster.models.layers import Attention, GatedMLP, RMSNorm, RotaryEmbedding
from cluster.models.moe import SparseMoE
from cluster.parallel.handles import TPGroup
from cluster.parallel.linear import ParallelLMHead, VocabParallelEmbedding, reduced
from cluster.parallel.overlap import OverlapFlags, interleave


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ArchConfig, layer_id: int, tp: TPGroup, ep: TPGroup):
        super().__init__()
        self.self_attn = Attention(cfg, layer_id, tp)
        if cfg.is_moe and layer_id not in cfg.dense_layer_ids:
            self.mlp = SparseMoE(cfg, tp, ep)
        else:
            self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, tp)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # with tp.fuse_norm the attention's and a dense MLP's all-reduce join the norm after them
        self.self_attn.o_proj.defer_to_norm()
        if isinstance(self.mlp, GatedMLP):
            self.mlp.down_proj.defer_to_norm()

    def forward(self, positions, x, rotary, attn, residual=None):
        """Residual stream as in vLLM: returns (mlp out, residual), whose sum is the layer's output;
        each norm adds the pending branch into the residual (one fused kernel on CUDA), and with
        `tp.fuse_norm` the branch's all-reduce too (the mlp out may be `linear.Unreduced`)."""
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm(x, residual)
        h, residual = self.post_attention_layernorm(self.self_attn(positions, h, rotary, attn), residual)
        return self.mlp(h), residual

    def steps(self, positions, x, rotary, attn, overlap: OverlapFlags):
        """`forward` as a generator that yields while each collective is in flight (parallel/overlap.py)."""
        o_proj = self.self_attn.o_proj
        heads = self.self_attn.attend(positions, self.input_layernorm(x), rotary, attn)
        x = x + (yield from o_proj.reduce_steps(o_proj.partial(heads), overlap.tp))
        return x + (yield from self.mlp.steps(self.post_attention_layernorm(x), overlap))


class DecoderModel(nn.Module):
    """Embedding (first stage), a stack of decoder layers (all, or one pipeline stage's share), final norm (last stage)."""

    def __init__(self, cfg: ArchConfig, tp: TPGroup, ep: TPGroup, layer_range: range | None = None):
        super().__init__()
        self.layer_range = layer_range or range(cfg.num_layers)
        first, last = self.layer_range.start == 0, self.layer_range.stop == cfg.num_layers
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp) if first else None
        self.layers = nn.ModuleDict({str(i): DecoderLayer(cfg, i, tp, ep) for i in self.layer_range})
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if last else None


class CausalLM(nn.Module):
    """The whole decoder, or one pipeline stage of it.

    The first stage embeds and also owns the LM head: the last stage sends the normed
    hidden rows that sample back to it, so the rank that samples (world rank 0)
    computes the logits and tied embeddings stay one weight. `ep` (default: no expert
    parallelism) spreads MoE experts over the tp ranks.
    """

    def __init__(self, cfg: ArchConfig, max_positions: int, tp: TPGroup | None = None, ep: TPGroup | None = None,
                 layer_range: range | None = None):
        super().__init__()
        tp = tp or TPGroup.single()
        self.cfg = cfg
        self.model = DecoderModel(cfg, tp, ep or TPGroup.single(), layer_range)
        self.rotary = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling)
        self.is_first_stage = self.model.layer_range.start == 0
        self.is_last_stage = self.model.layer_range.stop == cfg.num_layers
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, tp) if self.is_first_stage else None
        if cfg.tie_word_embeddings and self.lm_head is not None:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """First stage embeds `input_ids`; later pipeline stages continue from `hidden`."""
        x = self.model.embed_tokens(input_ids) if self.is_first_stage else hidden
        residual = None
        for layer in self.model.layers.values():
            x, residual = layer(positions, x, self.rotary, attn, residual)
        return self.model.norm(x, residual)[0] if self.is_last_stage else reduced(x) + residual

    def forward_microbatches(self, batches: list[tuple], overlap: OverlapFlags) -> list[torch.Tensor]:
        """Several (input_ids, positions, attn, hidden) micro-batches through this stage, taking turns
        so each one's collectives overlap the others' compute; their outputs in order."""
        return interleave([self._steps(*batch, overlap) for batch in batches])

    def _steps(self, input_ids, positions, attn, hidden, overlap: OverlapFlags):
        x = self.model.embed_tokens(input_ids) if self.is_first_stage else hidden
        for layer in self.model.layers.values():
            x = yield from layer.steps(positions, x, self.rotary, attn, overlap)
        return self.model.norm(x) if self.is_last_stage else x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Full-vocab logits on tp rank 0 of the first stage; None on the other tp ranks."""
        return self.lm_head.logits(hidden)
