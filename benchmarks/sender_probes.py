"""What `benchmarks.disagg` measures of the KV sender beside each transfer: where its host time goes and
how long its gathers take on the device.

  stacked_groups     the [start, end) layer ranges a prefill stacks a request's KV into (one message each);
  gather_device_us   one request's stacked gathers timed on the device, three ways (torch's
                     index_select over bf16 elements, over 16-byte words, the engine's gather_blocks);
  event_pair         two CUDA events to put around one gather inside a timed transfer.
"""
from __future__ import annotations

import torch


def stacked_groups(engine, num_tokens: int, kv_dtype: torch.dtype) -> list[tuple[int, int]]:
    """The layer ranges a prefill instance sends a `num_tokens` prompt's KV in: as many whole layers a
    message as fit `prefill.GROUP_BYTES` (disagg/prefill.py, from the same public pieces)."""
    from cluster.disagg.prefill import GROUP_BYTES
    from cluster.engine.kv_handover import full_kv_shape, layer_groups

    num_blocks = -(-num_tokens // engine.kv.block_size)
    layer_bytes = max(1, torch.Size(full_kv_shape(engine.arch, num_blocks, engine.kv.block_size)).numel() * kv_dtype.itemsize)
    return layer_groups(engine.arch.num_layers, max(1, GROUP_BYTES // layer_bytes))


def gather_device_us(engine, index, groups) -> dict:
    """Device time of one request's stacked gathers (every group once): torch's `index_select` over bf16
    elements, over 16-byte words, and the engine's `gather_blocks` (the words, with its views and
    checks), medians of 5."""
    from cluster.engine.kv_blocks import gather_blocks

    if engine.device.type != "cuda":
        return {}
    stack, first = engine.runner.kv_stack, engine.runner.first_kv_layer
    words = stack.view(*stack.shape[:3], -1).view(torch.complex128)
    ways = {"index_select": lambda a, b: stack[a - first:b - first].index_select(2, index),
            "index_select_16_byte_words": lambda a, b: words[a - first:b - first].index_select(2, index),
            "gather_blocks": lambda a, b: gather_blocks(stack[a - first:b - first], 2, index)}
    out = {}
    for name, gather in ways.items():
        times = []
        for _ in range(6):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for a, b in groups:
                gather(a, b)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        out[name] = sorted(times[1:])[2]
    return out


def event_pair(device) -> list:
    """Two CUDA events to put around one gather (its device time); none on CPU."""
    if device.type != "cuda":
        return []
    return [torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)]

