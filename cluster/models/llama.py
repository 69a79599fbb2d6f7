"""The decoder every supported architecture shares (Llama, Mistral, Qwen2/3 and their MoE forms).

  forward(input_ids, positions, attn) -> hidden  [num_tokens, hidden]
  compute_logits(hidden[logits_indices]) -> logits [n, vocab]

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
from cluster.parallel.groups import TPGroup
from cluster.parallel.linear import ParallelLMHead, VocabParallelEmbedding


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

    def forward(self, positions, x, rotary, attn):
        x = x + self.self_attn(positions, self.input_layernorm(x), rotary, attn)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderModel(nn.Module):
    """Embedding, a stack of decoder layers (all of them, or one pipeline stage's share), final norm."""

    def __init__(self, cfg: ArchConfig, tp: TPGroup, ep: TPGroup, layer_range: range | None = None):
        super().__init__()
        self.layer_range = layer_range or range(cfg.num_layers)
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        self.layers = nn.ModuleDict({str(i): DecoderLayer(cfg, i, tp, ep) for i in self.layer_range})
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    def __init__(self, cfg: ArchConfig, max_positions: int, tp: TPGroup | None = None, ep: TPGroup | None = None,
                 layer_range: range | None = None):
        super().__init__()
        tp = tp or TPGroup.single()
        self.cfg = cfg
        self.model = DecoderModel(cfg, tp, ep or tp, layer_range)
        self.rotary = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling)
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size, tp)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.is_first_stage = self.model.layer_range.start == 0
        self.is_last_stage = self.model.layer_range.stop == cfg.num_layers

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn, hidden: torch.Tensor | None = None) -> torch.Tensor:
        """First stage embeds `input_ids`; later pipeline stages continue from `hidden`."""
        x = self.model.embed_tokens(input_ids) if self.is_first_stage else hidden
        for layer in self.model.layers.values():
            x = layer(positions, x, self.rotary, attn)
        return self.model.norm(x) if self.is_last_stage else x

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head.logits(hidden)
