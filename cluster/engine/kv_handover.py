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
"""
from __future__ import annotations

import torch


KV_TAG = 1 << 20  # above any pipeline micro-batch tag


def per_layer(messages: list[torch.Tensor]) -> list[torch.Tensor]:
    """KV messages as one [2, blocks, block_size, heads, dim] tensor per layer: a message is one
    layer, or several stacked ([k, 2, ...])."""
    layers: list[torch.Tensor] = []
    for message in messages:
        layers.extend(message.unbind(0) if message.dim() == 6 else [message])
    return layers


def gather_kv(worker, block_ids: list[int]) -> list[torch.Tensor] | None:
    """On world rank 0: every layer's KV of `block_ids`, [2, blocks, block_size, heads, dim]; None elsewhere."""
    tp, pipe, arch = worker.groups.tp, worker.groups.pipe, worker.arch
    index = worker.runner.block_index(block_ids)
    mine = {}
    for layer_id in worker.layer_range:
        kv = worker.runner.read_kv(layer_id, index)
        gathered = tp.gather_last_dim_to_first(kv.transpose(-1, -2))  # heads last for the gather
        if gathered is None:
            continue
        full = gathered.transpose(-1, -2)
        replicas = max(1, tp.size // arch.num_kv_heads)  # tp > kv heads: ranks hold copies
        mine[layer_id] = (full[..., ::replicas, :] if replicas > 1 else full).contiguous()
    if tp.rank != 0:
        return None
    if not pipe.is_first:
        for layer_id in worker.layer_range:
            pipe.send_to(0, mine[layer_id], KV_TAG + layer_id).wait()
        return None
    for stage in range(1, pipe.num_stages):
        for layer_id in worker.stage_ranges[stage]:
            mine[layer_id] = pipe.recv_from(stage, _full_kv_buffer(worker, len(block_ids)), KV_TAG + layer_id).wait()
    return [mine[layer_id] for layer_id in range(arch.num_layers)]


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
    for layer_id in worker.layer_range:
        full = local[layer_id] if tp.rank == 0 else _full_kv_buffer(worker, len(block_ids))
        tp.broadcast_from_first(full)
        qkv = worker.model.model.layers[str(layer_id)].self_attn.qkv_proj
        worker.runner.write_kv(layer_id, index, full.narrow(-2, qkv.kv_head_start, qkv.num_kv_heads))


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
