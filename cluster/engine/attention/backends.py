"""Attention backends by name (`RunnerConfig.attention_backend`): `make_backend`.

Apart from base.py so that the interface does not import its implementations (each of which
imports the interface): the dependency runs backends -> torch_ref/triton -> base, one way.
"""
from __future__ import annotations

import torch

from cluster.engine.attention.base import AttentionBackend


def make_backend(name: str, device: torch.device) -> AttentionBackend:
    """Pick a backend by name; heavy ones are imported only when chosen."""
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch_ref"
    if name == "torch_ref":
        from cluster.engine.attention.torch_ref import TorchRefAttention

        return TorchRefAttention()
    if name == "triton":
        from cluster.engine.attention.triton import TritonAttention

        return TritonAttention()
    raise ValueError(f"RunnerConfig.attention_backend={name!r} is not a known backend (torch_ref, triton)")
