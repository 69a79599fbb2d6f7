"""The KV hand-over of a multi-rank instance: every layer's KV of some blocks, with all KV heads,
gathered from the ranks to world rank 0 (a prefill instance's source) or scattered from it to
the ranks (a decode instance's sink), so that instances of any tp x pp layout can exchange KV.

    stage 0    stage 1          gather: (1) each stage's tp ranks gather their head shards to
    [w0 w1]    [w2 w3]                  the stage's tp rank 0 (tp group); (2) stage s's tp rank 0
      ^ |        |                      sends its layers to w0 (the column's pipe group);
      | '--------'              scatter: the same two hops, backwards; each tp rank keeps the
      w0 has every layer                 heads its own QKV projection makes (replicas when
                                         tp > KV heads).

Every rank of the instance calls these at once (executor.py broadcasts the command); the
messages of step (2) go in layer order, stage by stage, so gloo and NCCL pair them alike.

A prefill instance of one stage and several tp ranks streams instead (`stream_hook`): the step's
plan names the rows whose prompt KV leaves (`LayerStreams` on the driver, `StepPlan.streams` on the
wire), and every rank gathers each group of layers to rank 0 once the group's last layer is written,
while the next layers compute; rank 0 hands the group to the prefill's sender. After the step, as
above, is for pipelined prefill instances only.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


KV_TAG = 1 << 20  # above any pipeline micro-batch tag
SCATTER_RUN_BYTES = 64 << 20  # a decode instance hands its tp ranks the landed KV in broadcasts of up to this


def per_layer(messages: list[torch.Tensor]) -> list[torch.Tensor]:
    """KV messages as one [2, blocks, block_size, heads, dim] tensor per layer: a message is one
    layer, or several stacked ([k, 2, ...])."""
    layers: list[torch.Tensor] = []
    for message in messages:
        layers.extend(message.unbind(0) if message.dim() == 6 else [message])
    return layers


@dataclass
class LayerStreams:
    """What a prefill instance of several ranks streams in one step: per transfer, in send order,
    (sequence, prompt blocks, layers a message); and `sink(stream, group, kv)`, which takes each group
    of layers with every KV head on rank 0, [layers, 2, blocks, block_size, heads, dim]."""

    entries: list[tuple]
    sink: Callable[[int, int, torch.Tensor], None]


def layer_groups(num_layers: int, per_group: int) -> list[tuple[int, int]]:
    """[start, end) ranges of `per_group` consecutive layers (the last may be shorter): a transfer's messages."""
    return [(start, min(start + per_group, num_layers)) for start in range(0, num_layers, per_group)]


def stream_hook(worker, plan) -> Callable[[int], None] | None:
    """The layer hook of a step whose plan names KV streams (None if it names none). When a group's last
    layer is written, every rank reads that group's layers of the row's prompt blocks and gathers its
    heads to tp rank 0, which hands the group to `worker.kv_sink`. All ranks run the same gathers in
    the same order, the order the prefill announced: by the layer that ends each group, then by stream."""
    if not plan.streams:
        return None
    num_layers = worker.arch.num_layers
    leaving: dict[int, list[tuple[int, int, int, int]]] = {}
    blocks = {}
    for stream, (row, num_blocks, per_group) in enumerate(plan.streams):
        blocks[stream] = worker.runner.block_index(plan.block_tables[row, :num_blocks].tolist())
        for group, (start, end) in enumerate(layer_groups(num_layers, per_group)):
            leaving.setdefault(end - 1, []).append((stream, group, start, end))

    def on_layer_done(layer_id: int) -> None:
        for stream, group, start, end in leaving.get(layer_id, ()):
            kv = gather_heads(worker, worker.runner.read_kv_layers(start, end, blocks[stream]))
            if kv is not None and worker.kv_sink is not None:
                worker.kv_sink(stream, group, kv)

    return on_layer_done


def gather_heads(worker, kv: torch.Tensor) -> torch.Tensor | None:
    """`kv` [..., this rank's KV heads, dim] with every KV head, on tp rank 0 (None on the others)."""
    tp = worker.groups.tp
    gathered = tp.gather_last_dim_to_first(kv.transpose(-1, -2))  # heads last for the gather
    if gathered is None:
        return None
    full = gathered.transpose(-1, -2)
    replicas = max(1, tp.size // worker.arch.num_kv_heads)  # tp > kv heads: ranks hold copies
    return (full[..., ::replicas, :] if replicas > 1 else full).contiguous()


def gather_kv(worker, block_ids: list[int]) -> list[torch.Tensor] | None:
    """On world rank 0: every layer's KV of `block_ids`, [2, blocks, block_size, heads, dim]; None elsewhere."""
    tp, pipe = worker.groups.tp, worker.groups.pipe
    index = worker.runner.block_index(block_ids)
    mine = {}
    for layer_id in worker.layer_range:
        full = gather_heads(worker, worker.runner.read_kv(layer_id, index))
        if full is not None:
            mine[layer_id] = full
    if tp.rank != 0:
        return None
    if not pipe.is_first:
        for layer_id in worker.layer_range:
            pipe.send_to(0, mine[layer_id], KV_TAG + layer_id).wait()
        return None
    for stage in range(1, pipe.num_stages):
        for layer_id in worker.stage_ranges[stage]:
            mine[layer_id] = pipe.recv_from(stage, _full_kv_buffer(worker, len(block_ids)), KV_TAG + layer_id).wait()
    return [mine[layer_id] for layer_id in range(worker.arch.num_layers)]


def scatter_kv(worker, block_ids: list[int], layers: list[torch.Tensor] | None) -> None:
    """`layers` (on world rank 0, None elsewhere) into every rank's share of heads and layers."""
    tp, pipe = worker.groups.tp, worker.groups.pipe
    index = worker.runner.block_index(block_ids)
    local: dict[int, torch.Tensor] = {}
    if tp.rank == 0:
        if pipe.is_first:
            for stage in range(1, pipe.num_stages):
                for layer_id in worker.stage_ranges[stage]:
                    pipe.send_to(stage, _as_cache(worker, layers[layer_id]), KV_TAG + layer_id).wait()
            local = {layer_id: _as_cache(worker, layers[layer_id]) for layer_id in worker.layer_range}
        else:
            for layer_id in worker.layer_range:
                local[layer_id] = pipe.recv_from(0, _full_kv_buffer(worker, len(block_ids)), KV_TAG + layer_id).wait()
    qkv = worker.model.model.layers[str(worker.layer_range.start)].self_attn.qkv_proj  # every layer's heads alike
    if tp.size == 1:
        for layer_id in worker.layer_range:
            worker.runner.write_kv(layer_id, index, local[layer_id])
        return
    # to the stage's tp ranks in runs of layers, one broadcast a run (not one a layer: 32 collectives
    # per landed request sat between a decode instance's steps), each rank writing its heads of the run
    shape = full_kv_shape(worker.arch, len(block_ids), worker.runner.block_size)
    per_run = max(1, SCATTER_RUN_BYTES // (torch.Size(shape).numel() * cache_dtype(worker.runner).itemsize))
    layers_here = list(worker.layer_range)
    for at in range(0, len(layers_here), per_run):
        run = layers_here[at : at + per_run]
        if tp.rank == 0:
            full = stacked([local[layer_id] for layer_id in run])
        else:
            full = torch.empty((len(run), *shape), dtype=cache_dtype(worker.runner), device=worker.device)
        tp.broadcast_from_first(full)
        worker.runner.write_kv_layers(run[0], index, full.narrow(-2, qkv.kv_head_start, qkv.num_kv_heads))


def stacked(layers: list[torch.Tensor]) -> torch.Tensor:
    """`layers` (equal shapes) as one [len(layers), ...] tensor: a view where they already lie back to back
    in one tensor (the layers of one landed message, which the sender stacked as the run is cut), else
    a copy (`torch.stack`)."""
    first = layers[0]
    step = first.numel() * first.element_size()
    if all(t.is_contiguous() and t.shape == first.shape and t.dtype == first.dtype and t.device == first.device
           and t.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
           and t.data_ptr() == first.data_ptr() + i * step for i, t in enumerate(layers)):
        return first.as_strided((len(layers), *first.shape), (first.numel(), *first.stride()))
    return torch.stack(layers)


def cache_dtype(runner) -> torch.dtype:
    """The dtype of `runner`'s KV cache (what travels between instances)."""
    return next(c for c in runner.kv_layers if c is not None).dtype


def full_kv_shape(arch, num_blocks: int, block_size: int) -> tuple[int, ...]:
    """One layer's KV of `num_blocks` blocks with every KV head: [2, blocks, block_size, heads, dim],
    the unit that moves between instances whatever their layouts."""
    return (2, num_blocks, block_size, arch.num_kv_heads, arch.head_dim)


def _full_kv_buffer(worker, num_blocks: int) -> torch.Tensor:
    return torch.empty(full_kv_shape(worker.arch, num_blocks, worker.runner.block_size),
                       dtype=cache_dtype(worker.runner), device=worker.device)


def _as_cache(worker, kv: torch.Tensor) -> torch.Tensor:
    return kv.to(worker.device, cache_dtype(worker.runner)).contiguous()
