"""Build a ready-to-run model from a checkpoint directory."""
from __future__ import annotations

import contextlib

import torch

from cluster.models.hf_config import ArchConfig, load_arch_config
from cluster.models.llama import CausalLM
from cluster.models.loader import load_weights
from cluster.parallel.handles import TPGroup


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_model(model_dir: str, dtype: torch.dtype, device: torch.device, max_positions: int,
                tp: TPGroup | None = None, ep: TPGroup | None = None, layer_range: range | None = None,
                progress: bool = True) -> CausalLM:
    cfg = load_arch_config(model_dir)
    with _default_dtype(dtype), torch.device(device):
        model = CausalLM(cfg, max_positions, tp, ep, layer_range)
    load_weights(model, model_dir, progress=progress)
    return model.eval()


def arch_config(model_dir: str) -> ArchConfig:
    return load_arch_config(model_dir)
