"""The one place that knows which process groups a rank belongs to.

An instance is `tp x pp` ranks. Layers receive the `TPGroup` they shard over
and never look anything up globally. A single-device instance uses
`TPGroup.single()`: rank 0 of size 1, no collective is ever called.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TPGroup:
    """A tensor-parallel group as the layers see it."""

    rank: int = 0
    size: int = 1
    group: object | None = None  # torch.distributed ProcessGroup; None when size == 1

    @staticmethod
    def single() -> "TPGroup":
        return TPGroup()

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)
