"""The handles layers talk through: a tensor-parallel group, a pipeline column, the host group.

groups.py builds the process groups and wraps them in these; a layer gets its `TPGroup` (experts
their EP group), the pipeline its `PipeGroup`, the executor the `HostGroup`. A collective launched
asynchronously comes back as `Pending`: on CUDA its `wait()` orders the current stream after it
without blocking the host.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch._C._distributed_c10d import (AllgatherOptions, AllreduceOptions, AllToAllOptions, BroadcastOptions,
                                        GatherOptions, ReduceOp)

if TYPE_CHECKING:
    from cluster.parallel.one_shot import OneShotAllReduce


class Pending:
    """A collective in flight. `wait()` returns its result; on CUDA it orders the current
    stream after the collective (which ran on the backend's own stream) without blocking the host."""

    __slots__ = ("work", "result")

    def __init__(self, work, result):
        self.work = work
        self.result = result

    def wait(self):
        if self.work is not None:
            self.work.wait()
            self.work = None
        return self.result


@dataclass(frozen=True)
class TPGroup:
    """A tensor- (or expert-) parallel group as the layers see it; size 1 never communicates."""

    rank: int = 0
    size: int = 1
    group: object | None = None  # c10d ProcessGroup; None when size == 1
    one_shot: OneShotAllReduce | None = None  # small all-reduces through peer memory (CUDA), else NCCL
    # row-parallel layers leave their all-reduce to the norm after them (linear.Unreduced), which fuses
    # it with the residual add and the norm where the one-shot all-reduce can (ParallelConfig.fuse_all_reduce_norm)
    fuse_norm: bool = False

    @staticmethod
    def single() -> "TPGroup":
        return TPGroup()

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over the group; may be a new tensor (use the return value)."""
        if self.size == 1:
            return x
        if self.one_shot is not None and self.one_shot.fits(x):
            return self.one_shot(x)
        self.group.allreduce([x], AllreduceOptions()).wait()
        return x

    def all_reduce_async(self, x: torch.Tensor) -> Pending:
        if self.size == 1:
            return Pending(None, x)
        if self.one_shot is not None and self.one_shot.fits(x):
            return Pending(*self.one_shot.on_side_stream(x))
        return Pending(self.group.allreduce([x], AllreduceOptions()), x)

    def all_gather_rows_async(self, x: torch.Tensor) -> Pending:
        """[n, ...] on every rank -> [size * n, ...], rank r's rows at r*n."""
        if self.size == 1:
            return Pending(None, x)
        x = x.contiguous()
        out = x.new_empty((self.size * x.shape[0], *x.shape[1:]))
        return Pending(self.group._allgather_base(out, x, AllgatherOptions()), out)

    def broadcast_from_first(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's `x` lands in every rank's `x` (same shape and dtype everywhere)."""
        return _broadcast_from_first(self.group, self.size, x)

    def gather_last_dim_to_first(self, x: torch.Tensor) -> torch.Tensor | None:
        """Rank 0 gets every rank's x concatenated on the last dim; the others get None."""
        if self.size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.rank == 0 else []
        opts = GatherOptions()
        opts.rootRank = 0
        self.group.gather([parts] if parts else [], [x], opts).wait()
        return torch.cat(parts, dim=-1) if self.rank == 0 else None

    def all_to_all_async(self, x: torch.Tensor, send_splits: list[int], recv_splits: list[int]) -> Pending:
        """Rows [sum(send_splits), ...]: split i goes to rank i; returns [sum(recv_splits), ...]."""
        x = x.contiguous()
        out = x.new_empty((sum(recv_splits), *x.shape[1:]))
        return Pending(self.group.alltoall_base(out, x, recv_splits, send_splits, AllToAllOptions()), out)


@dataclass(frozen=True)
class PipeGroup:
    """The point-to-point links of one rank's tp column: previous/next stage and the way back."""

    stage: int = 0
    num_stages: int = 1
    forward: object | None = None  # ProcessGroup of the column; group rank == stage
    back: object | None = None  # ProcessGroup {0: first stage, 1: last stage}

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.num_stages - 1

    def send_next(self, x: torch.Tensor, tag: int) -> Pending:
        x = x.contiguous()  # held by the Pending until the send completes
        return Pending(self.forward.send([x], self.stage + 1, tag), x)

    def recv_prev(self, out: torch.Tensor, tag: int) -> Pending:
        return Pending(self.forward.recv([out], self.stage - 1, tag), out)

    def send_to(self, stage: int, x: torch.Tensor, tag: int) -> Pending:
        """Any stage of the column to any other (the KV hand-over; not the step's activations)."""
        x = x.contiguous()
        return Pending(self.forward.send([x], stage, tag), x)

    def recv_from(self, stage: int, out: torch.Tensor, tag: int) -> Pending:
        return Pending(self.forward.recv([out], stage, tag), out)

    def send_first(self, x: torch.Tensor, tag: int) -> Pending:
        x = x.contiguous()
        return Pending(self.back.send([x], 0, tag), x)

    def recv_last(self, out: torch.Tensor, tag: int) -> Pending:
        return Pending(self.back.recv([out], 1, tag), out)


@dataclass(frozen=True)
class HostGroup:
    """Every rank of the instance, on CPU: the step broadcast and start-up agreements."""

    rank: int = 0
    size: int = 1
    group: object | None = None

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's `x` lands in every rank's `x` (same shape and dtype everywhere)."""
        return _broadcast_from_first(self.group, self.size, x)

    def min_int(self, value: int) -> int:
        x = torch.tensor([value], dtype=torch.int64)
        if self.size > 1:
            opts = AllreduceOptions()
            opts.reduceOp = ReduceOp.MIN
            self.group.allreduce([x], opts).wait()
        return int(x.item())

    def gather_to_first(self, x: torch.Tensor) -> list[torch.Tensor] | None:
        """Rank 0 gets every rank's `x` (same shape everywhere) in rank order; the others None."""
        if self.size == 1:
            return [x]
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.rank == 0 else []
        opts = GatherOptions()
        opts.rootRank = 0
        self.group.gather([parts] if parts else [], [x.contiguous()], opts).wait()
        return parts if self.rank == 0 else None


def _broadcast_from_first(group, size: int, x: torch.Tensor) -> torch.Tensor:
    if size > 1:
        opts = BroadcastOptions()
        opts.rootRank = 0
        group.broadcast([x], opts).wait()
    return x
