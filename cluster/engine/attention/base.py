"""The attention interface: one call per layer over a flat, mixed token batch.

A step's tokens are packed back to back (prefill chunks and decodes alike):

    tokens:      | seq0 chunk (5) | seq1 decode (1) | seq2 chunk (3) |
    query_start:  0                5                 6                9

Sequence s owns queries [query_start[s], query_start[s+1]); its context is
`seq_lens[s]` tokens long, the last `query_len` of which are the new ones, so
query i of s sits at position `seq_lens[s] - query_len + i` and attends to
positions 0..that position (causal). KV lives in paged blocks:

    k_cache[layer]: [num_blocks, block_size, num_kv_heads, head_dim]
    position p of seq s -> block block_tables[s, p // block_size], offset p % block_size

`slot_mapping[t]` = block * block_size + offset where new token t's K/V go
(-1: don't write, e.g. padding in a captured CUDA graph).

Backends (chosen by name in RunnerConfig.attention_backend, by `backends.make_backend`):
  forward(q, k, v, k_cache, v_cache, meta, scale) -> out  -- called by every
  attention layer; writes k/v at slot_mapping, then attends.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """Where each sequence's queries and KV are, for one step (device tensors + host copies)."""

    query_start_loc: torch.Tensor  # int32 [num_seqs + 1]
    seq_lens: torch.Tensor  # int32 [num_seqs]: context length including this step's tokens
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks_per_seq]
    slot_mapping: torch.Tensor  # int64 [num_tokens]
    max_query_len: int
    max_seq_len: int
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)


class AttentionBackend(ABC):
    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        ...

    def warm_up(self, num_heads: int, k_cache: torch.Tensor, v_cache: torch.Tensor, max_seq_len: int) -> None:
        """Launch each decode kernel variant the backend may pick up to `max_seq_len` once (a backend
        that compiles its kernels on first use: Triton); the runner's warm-up prefill covers the rest."""


@dataclass
class AttnInputs:
    """What every attention layer reads during one forward (the runner, its warm-up and its
    captured graphs build it; the model's attention layers read it)."""

    backend: AttentionBackend
    meta: AttentionMetadata
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    on_layer_done: Callable[[int], None] | None = None  # called after each layer wrote its KV


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Scatter this step's K/V into their slots (slots < 0 are skipped)."""
    flat_k = k_cache.view(-1, *k_cache.shape[2:])
    flat_v = v_cache.view(-1, *v_cache.shape[2:])
    valid = slot_mapping >= 0
    if bool(valid.all()):
        flat_k.index_copy_(0, slot_mapping, k)
        flat_v.index_copy_(0, slot_mapping, v)
    else:
        flat_k[slot_mapping[valid]] = k[valid]
        flat_v[slot_mapping[valid]] = v[valid]
