"""All-reduce over 2 GPUs as the engine's tp group does it: NCCL and the one-shot peer-memory kernel.

    measure_all_reduce(sizes, hidden, device) -> ({num_tokens: row}, info)

Two spawned ranks build the same groups an instance builds (parallel/groups.py) and time, for
each [num_tokens, hidden] message: 100 back to back (what a step's string of all-reduces sees),
one at a time with a sync around each, and (CUDA) 64 captured in a CUDA graph and replayed,
which is the device time a graph-captured decode step pays, without the host's launch cost.
"""
from __future__ import annotations

import statistics
import time

import torch

from cluster.config import ParallelConfig


def measure_all_reduce(sizes: list[int], hidden: int, device_type: str) -> tuple[dict, dict]:
    from cluster.parallel.groups import serve_store

    ctx = torch.multiprocessing.get_context("spawn")
    store = serve_store("127.0.0.1", 0, 2, 120)
    queue = ctx.Queue()
    procs = [ctx.Process(target=_allreduce_rank, args=(rank, store.port, sizes, queue, hidden, device_type))
             for rank in range(2)]
    for p in procs:
        p.start()
    results, info = queue.get(timeout=300)
    for p in procs:
        p.join(60)
    return results, info


def _allreduce_rank(rank: int, port: int, sizes: list[int], queue, hidden: int, device_type: str) -> None:
    from dataclasses import replace

    from cluster.parallel.groups import build_groups, dial_store
    from cluster.platform import current_platform

    platform = current_platform(device_type)
    device = platform.bind(rank, 2)
    sync = platform.synchronize
    store = dial_store("127.0.0.1", port, 2, 120)
    groups = build_groups(rank, ParallelConfig(tensor_parallel_size=2), platform.dist_backend, store)
    groups.connect(device, platform.default_dtype, ParallelConfig().one_shot_all_reduce_max_bytes)
    ways = {"nccl": replace(groups.tp, one_shot=None)}
    if groups.tp.one_shot is not None:
        ways["one_shot"] = groups.tp
    out = {}
    for num_tokens in sizes:
        x = torch.randn(num_tokens, hidden, device=device, dtype=platform.default_dtype)
        row = {}
        for name, tp in ways.items():
            if name == "one_shot" and not tp.one_shot.fits(x):
                continue
            for _ in range(10):
                tp.all_reduce(x)
            sync()
            t0 = time.perf_counter()
            for _ in range(100):  # back to back: what a step's string of all-reduces sees
                tp.all_reduce(x)
            sync()
            row[f"{name}_loop_us"] = (time.perf_counter() - t0) * 1e4  # s / 100 * 1e6
            synced = []
            for _ in range(50):
                sync()
                t0 = time.perf_counter()
                tp.all_reduce(x)
                sync()
                synced.append((time.perf_counter() - t0) * 1e6)
            row[f"{name}_synced_us"] = statistics.median(synced)
            if device_type == "cuda":
                row[f"{name}_graph_us"] = _graph_all_reduce_us(tp, x, sync)
        out[num_tokens] = row
    if rank == 0:
        queue.put((out, {"one_shot": groups.tp.one_shot is not None, "one_shot_error": groups.one_shot_error}))


def _graph_all_reduce_us(tp, x: torch.Tensor, sync, per_graph: int = 64) -> float | None:
    """Device time of one all-reduce as a decode step's CUDA graph runs it: `per_graph` of them
    captured back to back (a step's 2 per layer x 32 layers), replayed, no host launch cost."""
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                tp.all_reduce(x)
        torch.cuda.current_stream().wait_stream(stream)
        sync()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(per_graph):
                tp.all_reduce(x)
        for _ in range(3):
            graph.replay()
        sync()
        t0 = time.perf_counter()
        for _ in range(10):
            graph.replay()
        sync()
        return (time.perf_counter() - t0) / (10 * per_graph) * 1e6
    except RuntimeError:  # a path that cannot be captured says so by its absence
        return None
