"""Layers shared by every decoder: RMSNorm, rotary embedding, gated MLP, attention.

Numerics follow the Hugging Face reference implementations exactly (norms in
float32 then cast back, cos/sin computed in float32) so that float32 runs are
token-for-token identical to `transformers`. On CUDA the elementwise parts run as
fused Triton kernels; elsewhere `cluster.ops.fused` runs this same torch code.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from cluster.ops import fused
from cluster.parallel.handles import TPGroup
from cluster.parallel.linear import (MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear, Unreduced,
                                     default_loader)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.weight.weight_loader = default_loader

    def forward(self, x, residual: torch.Tensor | None = None):
        """norm(x); with `residual`, (norm(x + residual), x + residual) -- the add fused on CUDA. `x` may be
        a row-parallel layer's `Unreduced` partial sum: its all-reduce joins the add (one kernel where it can)."""
        if isinstance(x, Unreduced):
            return x.add_rms_norm(residual, self.weight, self.eps) if residual is not None else self.forward(x.reduced())
        if residual is None:
            return fused.rms_norm(x, self.weight, self.eps)
        return fused.fused_add_rms_norm(x, residual, self.weight, self.eps)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling is None:
        return inv_freq
    # llama3: long wavelengths are slowed by `factor`, short ones kept, a smooth ramp between.
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Neox-style rotary embedding with a precomputed cos/sin table per position."""

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None):
        super().__init__()
        inv_freq = rope_inv_freq(head_dim, theta, scaling)
        freqs = torch.arange(max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotated (q, k): in place on CUDA, new tensors on the torch path -- use the result."""
        return fused.rotary_(q, k, positions, self.cos, self.sin)


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)), gate|up merged in one column-parallel weight."""

    def __init__(self, hidden: int, intermediate: int, tp: TPGroup, reduce_results: bool = True):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden, [intermediate, intermediate], tp)
        self.down_proj = RowParallelLinear(intermediate, hidden, tp, reduce_results=reduce_results)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(fused.silu_and_mul(self.gate_up_proj(x)))

    def steps(self, x: torch.Tensor, overlap):
        """`forward` as a generator that yields while the all-reduce is in flight (parallel/overlap.py)."""
        act = fused.silu_and_mul(self.gate_up_proj(x))
        return (yield from self.down_proj.reduce_steps(self.down_proj.partial(act), overlap.tp))


class Attention(nn.Module):
    """QKV projection, optional q/k RMSNorm, rotary, paged attention, output projection."""

    def __init__(self, cfg, layer_id: int, tp: TPGroup):
        super().__init__()
        self.layer_id = layer_id
        self.head_dim = cfg.head_dim
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads, tp, bias=cfg.qkv_bias)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.o_proj = RowParallelLinear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, tp)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.scale = cfg.head_dim**-0.5

    def forward(self, positions: torch.Tensor, x: torch.Tensor, rotary: RotaryEmbedding, attn) -> torch.Tensor:
        return self.o_proj(self.attend(positions, x, rotary, attn))

    def attend(self, positions: torch.Tensor, x: torch.Tensor, rotary: RotaryEmbedding, attn) -> torch.Tensor:
        """Everything before the output projection: this rank's heads, [num_tokens, heads * head_dim]."""
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotary(positions, q, k)
        k_cache, v_cache = attn.kv_caches[self.layer_id]
        out = attn.backend.forward(q, k, v, k_cache, v_cache, attn.meta, self.scale)
        if attn.on_layer_done is not None:  # KV of this layer is in the cache: it may start streaming
            attn.on_layer_done(self.layer_id)
        return out.reshape(-1, q_size)
