"""Tensor-parallel building blocks: every weight of a model is one of these.

Each parameter carries a `weight_loader(param, source, shard_id)` that copies
its own shard out of `source`, a safetensors slice (or a tensor), so a rank
reads only the rows/columns it keeps and never materialises the full weight.

  ColumnParallelLinear   W [out, in]: rank r keeps rows  r*out/tp .. (r+1)*out/tp
  RowParallelLinear      W [out, in]: rank r keeps cols  r*in/tp  .. ; all-reduce after
  QKVParallelLinear      q | k | v stacked; KV heads split, replicated if tp > kv heads
  MergedColumnParallel   gate | up stacked (each split like a column linear)
  VocabParallelEmbedding rows of the vocab split; masked lookup + all-reduce

With `TPGroup.fuse_norm`, the row-parallel layers a decoder layer marks (`defers_to_norm`) return their
partial sum as `Unreduced`, and the RMSNorm after them reduces it together with its residual add: one
kernel on CUDA (parallel/one_shot_norm.py), the all-reduce and `fused_add_rms_norm` elsewhere.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cluster.ops import fused
from cluster.parallel.handles import TPGroup
from cluster.parallel.overlap import all_reduce_steps


def narrow(source, dim: int, start: int, length: int) -> torch.Tensor:
    """Read [start, start+length) along `dim` of a tensor or a lazy safetensors slice."""
    if isinstance(source, torch.Tensor):
        return source.narrow(dim, start, length)
    index = [slice(None)] * len(source.get_shape())
    index[dim] = slice(start, start + length)
    return source[tuple(index)]


def materialise(source) -> torch.Tensor:
    return source if isinstance(source, torch.Tensor) else source[:]


def shape_of(source) -> tuple[int, ...]:
    return tuple(source.shape) if isinstance(source, torch.Tensor) else tuple(source.get_shape())


def copy_checked(dst: torch.Tensor, src: torch.Tensor, name: str = "") -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise ValueError(f"weight {name or '?'}: checkpoint shape {tuple(src.shape)} does not match the model's {tuple(dst.shape)}")
    dst.copy_(src)


def _param(shape: tuple[int, ...], loader) -> nn.Parameter:
    p = nn.Parameter(torch.empty(shape), requires_grad=False)
    p.weight_loader = loader
    return p


def default_loader(param: nn.Parameter, source, shard_id=None) -> None:
    copy_checked(param.data, materialise(source))


class ReplicatedLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.weight = _param((out_features, in_features), default_loader)
        self.bias = _param((out_features,), default_loader) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class ColumnParallelLinear(nn.Module):
    """Output features split across ranks; the output stays sharded."""

    def __init__(self, in_features: int, out_features: int, tp: TPGroup, bias: bool = False):
        super().__init__()
        if out_features % tp.size:
            raise ValueError(f"output size {out_features} is not divisible by tensor parallel size {tp.size}")
        self.tp = tp
        self.out_per_rank = out_features // tp.size
        self.weight = _param((self.out_per_rank, in_features), self._load)
        self.bias = _param((self.out_per_rank,), self._load) if bias else None

    def _load(self, param, source, shard_id=None) -> None:
        copy_checked(param.data, narrow(source, 0, self.tp.rank * self.out_per_rank, self.out_per_rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column linears stacked in one weight (gate | up), each split per rank."""

    def __init__(self, in_features: int, out_sizes: list[int], tp: TPGroup, bias: bool = False):
        super().__init__(in_features, sum(out_sizes), tp, bias)
        self.out_sizes_per_rank = [size // tp.size for size in out_sizes]

    def _load(self, param, source, shard_id=None) -> None:
        size = self.out_sizes_per_rank[shard_id]
        offset = sum(self.out_sizes_per_rank[:shard_id])
        copy_checked(param.data.narrow(0, offset, size), narrow(source, 0, self.tp.rank * size, size))


class QKVParallelLinear(ColumnParallelLinear):
    """q | k | v in one weight. Query heads split across ranks; KV heads split
    too, or replicated (each rank keeps one head) when tp > num_kv_heads."""

    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, tp: TPGroup, bias: bool = False):
        if num_heads % tp.size:
            raise ValueError(f"num_attention_heads={num_heads} is not divisible by tensor parallel size {tp.size}")
        if tp.size > num_kv_heads and tp.size % num_kv_heads:
            raise ValueError(f"tensor parallel size {tp.size} is neither a divisor nor a multiple of num_key_value_heads={num_kv_heads}")
        self.head_dim = head_dim
        self.num_heads = num_heads // tp.size
        self.num_kv_heads = max(1, num_kv_heads // tp.size)
        self.kv_head_start = (tp.rank * num_kv_heads) // tp.size if tp.size > num_kv_heads else tp.rank * self.num_kv_heads
        total = (self.num_heads + 2 * self.num_kv_heads) * head_dim
        super().__init__(hidden, total * tp.size, tp, bias)

    def _load(self, param, source, shard_id=None) -> None:
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        if shard_id == "q":
            dst, start = param.data.narrow(0, 0, q_size), self.tp.rank * q_size
        else:
            offset = q_size if shard_id == "k" else q_size + kv_size
            dst, start = param.data.narrow(0, offset, kv_size), self.kv_head_start * self.head_dim
        copy_checked(dst, narrow(source, 0, start, dst.shape[0]))


@dataclass
class Unreduced:
    """A row-parallel layer's partial sum whose all-reduce is left to the RMSNorm after it."""

    partial: torch.Tensor
    tp: TPGroup

    def reduced(self) -> torch.Tensor:
        return self.tp.all_reduce(self.partial)

    def add_rms_norm(self, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(rms_norm(sum + residual), sum + residual): one kernel where the one-shot all-reduce takes it."""
        one_shot = self.tp.one_shot
        if one_shot is not None and one_shot.fits_norm(self.partial, residual):
            return one_shot.add_rms_norm(self.partial, residual, weight, eps)
        return fused.fused_add_rms_norm(self.reduced(), residual, weight, eps)


def reduced(x: "torch.Tensor | Unreduced") -> torch.Tensor:
    """`x` all-reduced now if its reduction was deferred."""
    return x.reduced() if isinstance(x, Unreduced) else x


class RowParallelLinear(nn.Module):
    """Input features split across ranks; partial sums are all-reduced (unless the caller defers it)."""

    def __init__(self, in_features: int, out_features: int, tp: TPGroup, bias: bool = False, reduce_results: bool = True):
        super().__init__()
        if in_features % tp.size:
            raise ValueError(f"input size {in_features} is not divisible by tensor parallel size {tp.size}")
        self.tp = tp
        self.reduce_results = reduce_results
        self.defers_to_norm = False  # `forward` returns `Unreduced` (the decoder layer sets it: `defer_to_norm`)
        self.in_per_rank = in_features // tp.size
        self.weight = _param((out_features, self.in_per_rank), self._load)
        self.bias = _param((out_features,), default_loader) if bias else None

    def _load(self, param, source, shard_id=None) -> None:
        copy_checked(param.data, narrow(source, 1, self.tp.rank * self.in_per_rank, self.in_per_rank))

    def defer_to_norm(self) -> None:
        """Leave the all-reduce to the RMSNorm this layer's output goes to (with `TPGroup.fuse_norm`)."""
        if self.tp.fuse_norm and self.reduce_results and self.bias is None:
            self.defers_to_norm = True

    def forward(self, x: torch.Tensor) -> "torch.Tensor | Unreduced":
        out = F.linear(x, self.weight)
        if self.defers_to_norm:
            return Unreduced(out, self.tp)
        if self.reduce_results:
            out = self.tp.all_reduce(out)
        if self.bias is not None:
            out = out + self.bias
        return out

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's partial sum, not yet reduced (see `reduce_steps`)."""
        return F.linear(x, self.weight)

    def reduce_steps(self, partial: torch.Tensor, overlap: bool):
        """Generator: all-reduce `partial`, yielding while it is in flight when `overlap`; returns the output."""
        out = yield from all_reduce_steps(self.tp, partial, overlap)
        return out + self.bias if self.bias is not None else out


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden: int, tp: TPGroup):
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.rows_per_rank = (vocab_size + tp.size - 1) // tp.size
        self.row_start = tp.rank * self.rows_per_rank
        self.weight = _param((self.rows_per_rank, hidden), self._load)

    def _load(self, param, source, shard_id=None) -> None:
        rows = max(0, min(self.rows_per_rank, shape_of(source)[0] - self.row_start))
        param.data.zero_()
        copy_checked(param.data.narrow(0, 0, rows), narrow(source, 0, self.row_start, rows))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.row_start
        outside = (local < 0) | (local >= self.rows_per_rank)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside[:, None], 0)
        return self.tp.all_reduce(out)


class ParallelLMHead(VocabParallelEmbedding):
    """Vocab-sharded output projection; full-vocab logits are gathered only on tp rank 0, which samples."""

    def logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        local = F.linear(hidden, self.weight)
        full = self.tp.gather_last_dim_to_first(local)
        return full[:, : self.vocab_size] if full is not None else None
