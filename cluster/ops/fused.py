"""Fused elementwise ops of the decoder: RMSNorm (+ residual add), rotary, SiLU-and-mul.

Each public function takes one of two paths, chosen in one place (`_use_triton`):

1. CUDA tensors (and triton importable): one Triton kernel (`fused_triton`),
   CUDA-graph capturable. A Llama decoder layer then runs 4 such kernels
   instead of ~30 small torch kernels.
2. Anything else: the exact torch code the layers used before, so float32 CPU
   runs stay bit-identical to `transformers` (tests/engine/test_parity.py).

Numerics of the kernels against the torch path (same inputs, on CUDA):

- rms_norm / fused_add_rms_norm: the same roundings (residual sum rounded to the
  input dtype, normalised value rounded to the input dtype before the weight);
  only the order of the fp32 sum of squares and rsqrt's last bits differ.
- silu_and_mul: silu in fp32 rounded to the input dtype, then the product in
  fp32 rounded once, as torch does; exp's last bits may differ.
- rotary_: computes x1*cos - x2*sin (and x2*cos + x1*sin) in fp32 with the fp32
  table and rounds once. The torch path rounds cos/sin to the input dtype and
  rounds each product and the sum, so in bf16 the two differ by about 1 ulp
  (2^-8 relative) on some elements; the kernel is the closer to exact.
"""
from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F


@functools.cache
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def _use_triton(t: torch.Tensor) -> bool:
    """The one switch between the Triton kernels and the torch reference code."""
    return t.is_cuda and _triton_importable()


def _kernels():
    from cluster.ops import fused_triton  # lazily: triton is optional

    return fused_triton


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x / rms(x)) over the last dim, in fp32, rounded to x's dtype before the weight."""
    if _use_triton(x):
        return _kernels().rms_norm_triton(x, weight, eps)
    return _rms_norm_torch(x, weight, eps)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual); x + residual stays in x's dtype."""
    if _use_triton(x):
        return _kernels().rms_norm_triton(x, weight, eps, residual=residual)
    return _fused_add_rms_norm_torch(x, residual, weight, eps)


def rotary_(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_cache: torch.Tensor,
            sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox rotary of q [T, Hq, D] and k [T, Hk, D] by the fp32 tables [max_pos, D] at `positions`.

    Callers must use the returned pair: the Triton path rotates q and k in place
    and returns them; the torch path leaves them untouched and returns new tensors.
    """
    if _use_triton(q):
        _kernels().rotary_triton_(q, k, positions, cos_cache, sin_cache)
        return q, k
    return _rotary_torch(q, k, positions, cos_cache, sin_cache)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2I], gate first -> silu(gate) * up [T, I]."""
    if _use_triton(gate_up):
        return _kernels().silu_and_mul_triton(gate_up)
    return _silu_and_mul_torch(gate_up)


# The torch path: the layers' code from before the kernels, kept verbatim (tests compare against it).


def _rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def _fused_add_rms_norm_torch(x, residual, weight, eps) -> tuple[torch.Tensor, torch.Tensor]:
    x = x + residual  # == residual + x bit for bit (IEEE addition commutes)
    return _rms_norm_torch(x, weight, eps), x


def _rotary_torch(q, k, positions, cos_cache, sin_cache) -> tuple[torch.Tensor, torch.Tensor]:
    cos = cos_cache[positions].to(q.dtype)[:, None, :]
    sin = sin_cache[positions].to(q.dtype)[:, None, :]
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _silu_and_mul_torch(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
