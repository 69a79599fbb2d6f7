"""Pipeline parallelism: layers partitioned over stages, micro-batches flowing through.

One step on stage s of P (GPipe inside the step; every rank runs the same plan):
  (1) the step's tokens are cut into M micro-batches (engine/step_plan.split);
  (2) receives are posted up front: stage s > 0 for each micro-batch's activations,
      stage 0 for each micro-batch's hidden rows coming back from the last stage;
  (3) for m in 0..M-1: wait for m's input, run this stage's layers, send the result on
      (without waiting for the send when `async_send`, else waiting at once); the last
      stage sends only the normed rows that sample, back to stage 0;
  (4) stage 0 turns each returned micro-batch into logits as it arrives (the caller).

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
    incoming = [] if pipe.is_first else [
        pipe.recv_prev(torch.empty(num_tokens, hidden_size, dtype=dtype, device=device), tag=m)
        for m, (num_tokens, _) in enumerate(part_sizes)]
    returns = [] if not pipe.is_first else [
        pipe.recv_last(torch.empty(num_rows, hidden_size, dtype=dtype, device=device), tag=m) if num_rows else None
        for m, (_, num_rows) in enumerate(part_sizes)]
    sends: list[Pending] = []
    for m in range(len(part_sizes)):
        out = forward_part(m, incoming[m].wait() if incoming else None)
        if out is None:
            continue
        sends.append(pipe.send_first(out, tag=m) if pipe.is_last else pipe.send_next(out, tag=m))
        if not async_send:
            sends[-1].wait()
    for send in sends:
        send.wait()
    return returns
