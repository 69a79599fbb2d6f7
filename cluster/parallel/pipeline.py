"""Pipeline parallelism: layers partitioned over stages, micro-batches flowing through.

One step on stage s of P (GPipe inside the step; every rank runs the same plan):
  (1) the step's tokens are cut into M micro-batches (engine/step_plan.split);
  (2) for m in 0..M-1: receive m's input (stage s > 0), run this stage's layers, send the
      result on (without waiting for the send when `async_send`, else waiting at once); the
      last stage sends only the normed rows that sample, back to stage 0;
  (3) stage 0 posts the receive of m's returned rows right after sending m on, and the
      caller turns each into logits as it arrives.

A receive is posted only once what it waits for cannot depend on anything this rank has
yet to send. On NCCL a posted receive is a kernel that spins until its data comes, and
any device-wide wait of that process (the allocator freeing cached memory, a synchronize)
waits behind it: with every return posted before the first forward, stage 0 hung in that
forward while stage 1 waited for its activations (2xH200, first run). Posted later than
(3), a synchronous send of the last stage would wait for stage 0, which waits to send it
the next micro-batch (gloo). The host runs ahead of the device, so each receive is still
posted long before the device gets to it.

    stage 0:  F0 F1 F2 F3 ·········· L0 L1 L2 L3      F: layers   L: logits
    stage 1:     F0 F1 F2 F3                          · : idle (the bubble)

With M micro-batches each stage idles about (P-1)/(M+P-1) of the step; the driver can
measure it (busy time per stage against the step's wall time).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from cluster.parallel.groups import Pending, PipeGroup


def stage_layers(num_layers: int, num_stages: int, stage: int) -> range:
    """The layers stage `stage` runs: an even, contiguous share (ParallelConfig checks divisibility)."""
    per_stage = num_layers // num_stages
    return range(stage * per_stage, (stage + 1) * per_stage)


def run_stage(pipe: PipeGroup, part_sizes: list[tuple[int, int]], forward_part: Callable[[int, torch.Tensor | None], torch.Tensor | None],
              hidden_size: int, dtype: torch.dtype, device: torch.device, async_send: bool) -> list[Pending | None]:
    """Run this stage's share of every micro-batch.

    part_sizes[m] = (num_tokens, num_sampling_rows) of micro-batch m. `forward_part(m, hidden)`
    runs the stage's layers (hidden is None on stage 0) and returns what to send: the
    activations, or on the last stage the normed sampling rows (None when it has none).
    On stage 0 returns, per micro-batch, the pending receive of its returned rows.
    """
    sends: list[Pending] = []
    returns: list[Pending | None] = []
    for m, (num_tokens, num_rows) in enumerate(part_sizes):
        incoming = None
        if not pipe.is_first:
            incoming = pipe.recv_prev(torch.empty(num_tokens, hidden_size, dtype=dtype, device=device), tag=m).wait()
        out = forward_part(m, incoming)
        if out is None:
            continue
        sends.append(pipe.send_first(out, tag=m) if pipe.is_last else pipe.send_next(out, tag=m))
        if pipe.is_first:
            returns.append(pipe.recv_last(torch.empty(num_rows, hidden_size, dtype=dtype, device=device), tag=m)
                           if num_rows else None)
        if not async_send:
            sends[-1].wait()
    for send in sends:
        send.wait()
    return returns
