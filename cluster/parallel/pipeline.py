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

With M micro-batches each stage idles about (P-1)/(M+P-1) of the step.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from cluster.parallel.handles import Pending, PipeGroup


def stage_ranges(arch, num_stages: int, partition: str = "balanced") -> list[range]:
    """The contiguous layers each stage runs (ParallelConfig.pp_layer_partition; check_model has
    validated it against the model):
      even      the same number each (the layer count must divide);
      balanced  stage 0 also reads the LM head (it samples): it counts as the layers its weights
                make (`lm_head_layers`), and stage 0 takes that many fewer; the Llama-3-8B shape on
                two stages gets 15 + 17, where even gave stage 0 a fifth more to read than stage 1;
      "a,b,..." those counts, stage by stage."""
    num_layers = arch.num_layers
    if partition == "even":
        counts = [num_layers // num_stages] * num_stages
    elif partition == "balanced":
        counts = balanced_counts(num_layers, num_stages, lm_head_layers(arch))
    else:
        counts = [int(c) for c in partition.split(",")]
    starts = [sum(counts[:s]) for s in range(num_stages)]
    return [range(start, start + count) for start, count in zip(starts, counts)]


def balanced_counts(num_layers: int, num_stages: int, first_stage_extra: float) -> list[int]:
    """Layers per stage so that stage 0's layers plus `first_stage_extra` layers' worth of other work
    come as close as whole layers allow to every other stage's; each stage keeps at least one."""
    if num_stages == 1:
        return [num_layers]
    per_stage = (num_layers + first_stage_extra) / num_stages
    first = min(max(1, round(per_stage - first_stage_extra)), num_layers - (num_stages - 1))
    rest, extra = divmod(num_layers - first, num_stages - 1)
    return [first] + [rest + (1 if s >= num_stages - 1 - extra else 0) for s in range(num_stages - 1)]


def lm_head_layers(arch) -> float:
    """The LM head's weights over one decoder layer's (attention and MLP; every expert of an MoE
    layer, as a decode batch of any size touches most of them): what stage 0 reads beyond its layers."""
    hidden, head_dim = arch.hidden_size, arch.head_dim
    attention = hidden * head_dim * (2 * arch.num_heads + 2 * arch.num_kv_heads)
    if arch.num_experts:
        mlp = 3 * hidden * (arch.moe_intermediate_size * arch.num_experts + arch.shared_expert_intermediate_size)
    else:
        mlp = 3 * hidden * arch.intermediate_size
    return arch.vocab_size * hidden / (attention + mlp)


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
