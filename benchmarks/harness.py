"""How the parallel benchmark makes, fills and times engines (benchmarks/parallel.py's parts use these).

  checkpoints   `ensure_llama8b` / `ensure_qwen3_moe`: the random benchmark checkpoints, made once;
  isolation     `in_fresh_process`: one engine layout per spawned process (torch numbers
                symmetric-memory rendezvous per process; the GPU is surely let go between layouts);
  engines       `make_engine`, `fill` (a batch held at a context length), `use_variant` (executor
                flags and async scheduling switched between timed windows), `drain`;
  timing        `time_steps`, `timed_tokens`, `decode_sweep`, `prefill_time`; `emit` prints each
                result as one JSON line and appends it to `--out`; `graph_time_ms`: device time of a
                captured call (the kernel benches use it too)
"""
from __future__ import annotations

import gc
import json
import os
import random
import statistics
import time

import torch

from benchmarks.profile import profile_steps
from cluster.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, RunnerConfig, SchedulerConfig
from cluster.types import SamplingParams


def emit(args, record: dict) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    with open(args.out, "a") as f:
        f.write(line + "\n")


# -- checkpoints ---------------------------------------------------------------------------
def ensure_llama8b(path: str, args, rank_of_tp: int = 1) -> str:
    """The Llama-3-8B-shaped checkpoint; `rank_of_tp` > 1: the part one rank of that TP size holds."""
    if not os.path.isdir(path):
        from cluster.models.make import make_llama3_8b_shape, make_model

        if args.smoke:
            return make_model("llama", path, num_layers=4, num_heads=4 // rank_of_tp, num_kv_heads=max(1, 2 // rank_of_tp),
                              head_dim=16, max_position_embeddings=8192, progress=False)
        make_llama3_8b_shape(path, rank_of_tp=rank_of_tp)
        release_memory()
    return path


def ensure_qwen3_moe(path: str, num_layers: int, args) -> str:
    """Qwen3-30B-A3B per layer (hidden 2048, 128 experts of 768, top-8, 4 KV heads of 128) except
    that q/o project to 16 heads, not 32 (make_model ties head_dim to hidden / heads)."""
    if not os.path.isdir(path):
        from cluster.models.make import make_model

        if args.smoke:
            return make_model("qwen3_moe", path, num_layers=2, num_experts=8, max_position_embeddings=8192, progress=False)
        make_model("qwen3_moe", path, num_layers=num_layers, hidden_size=2048, num_heads=16, num_kv_heads=4,
                   intermediate_size=6144, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
                   vocab_size=151936, max_position_embeddings=8192, rope_theta=1e6, dtype="bfloat16", device="cuda",
                   max_shard_size="5GB", progress=False)
        release_memory()
    return path


def release_memory() -> None:
    """Give cached GPU memory back (the next engine sizes its KV from what is free)."""
    gc.collect()
    torch.cuda.empty_cache()


def in_fresh_process(fn, *fn_args) -> None:
    """Run one engine layout in a process of its own (spawned; its ranks are its children). torch
    numbers symmetric-memory rendezvous per process, so a driver that already served a TP instance
    cannot set up the next one's one-shot all-reduce (it stays on NCCL); and the next layout starts
    on a GPU its predecessor has surely let go. A failure is emitted as the layout's error record."""
    import multiprocessing

    proc = multiprocessing.get_context("spawn").Process(target=_run_logged, args=(fn, *fn_args))
    proc.start()
    proc.join()
    if proc.exitcode:
        raise RuntimeError(f"{fn.__name__}{fn_args[1:]} exited with {proc.exitcode}")


def _run_logged(fn, args, *rest) -> None:
    try:
        fn(args, *rest)
    except Exception as exc:
        emit(args, {"part": fn.__name__, "error": f"{type(exc).__name__}: {exc}"})
        raise


def make_engine(path: str, args, cuda_graphs: bool = True, **parallel):
    """An engine of `path` as the parallel benchmark runs it; `cuda_graphs` off: every step eager."""
    from cluster.engine.engine import Engine

    cfg = EngineConfig(
        model=ModelConfig(path=path, dtype="float32" if args.smoke else "bfloat16", max_model_len=args.max_model_len),
        cache=CacheConfig(gpu_memory_fraction=0.85, enable_prefix_caching=False,
                          memory_budget_bytes=(1 << 30) if args.smoke else None),
        scheduler=SchedulerConfig(max_num_seqs=256, max_num_batched_tokens=8192),
        runner=RunnerConfig(device=args.device, enable_cuda_graphs=cuda_graphs, cuda_graph_max_batch=256),
        parallel=ParallelConfig(overlap_min_tokens=2, **parallel),
    )
    return Engine(cfg, progress=False)


# -- measurements --------------------------------------------------------------------------
def fill(engine, batch: int, context: int, steps: int, tag: str) -> None:
    """`batch` sequences with `context` tokens computed, each with room for `steps` more decode steps
    (early ones already decode while later prompts prefill, so they get that many on top)."""
    rng = random.Random(batch)
    vocab = engine.arch.vocab_size
    prefill_steps = -(-batch * context // engine.config.scheduler.max_num_batched_tokens) + 2
    params = SamplingParams(temperature=0.0, max_tokens=steps + prefill_steps, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"{tag}{i}", [rng.randrange(100, vocab - 100) for _ in range(context)], params)
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running + list(engine.scheduler.waiting)):
        engine.step()


def time_steps(engine, num_steps: int) -> float:
    """Median wall ms of `num_steps` steps (each ends in sampling, so it includes all GPU work)."""
    times = []
    for _ in range(num_steps):
        t0 = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def use_variant(engine, flags: dict) -> None:
    """Switch to a variant from the next step on: async scheduling (on unless it says off), the rest
    executor flags."""
    flags = dict(flags)
    engine.async_scheduling = flags.pop("async_scheduling", True)
    if "batches_in_flight" in flags:  # pp: the batches taking turns in the stages (ParallelConfig.pp_batches_in_flight)
        engine.executor.steps_in_flight = flags.pop("batches_in_flight")
    engine.executor.set_flags(**flags)


def timed_tokens(engine, num_steps: int) -> tuple[float, int]:
    """(wall seconds, tokens that came out) over `num_steps` steps: with pp and async scheduling a
    step launches half the batch, so throughput is counted in tokens, not assumed per step."""
    t0 = time.perf_counter()
    num_tokens = sum(len(delta.token_ids) for _ in range(num_steps) for delta in engine.step())
    return time.perf_counter() - t0, num_tokens


def drain(engine) -> None:
    while engine.has_unfinished():
        engine.step()


def decode_sweep(engine, args, tp: int, variants: dict[str, dict], label: dict | None = None) -> list[dict]:
    """Decode step time per batch size; variants (name -> executor flags) alternate on the same batch.
    `label`'s fields go into the profile records (`--profile`)."""
    rows = []
    for batch in args.batches:
        windows = len(variants) * 2
        fill(engine, batch, args.context, windows * (args.steps + 1) + 2 + (12 if args.profile else 0), tag=f"b{batch}-")
        engine.step()
        measured: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(2):  # alternate so drift hits every variant alike
            for name, flags in variants.items():
                use_variant(engine, flags)
                engine.step()  # first step after a switch is not timed
                measured[name].append(time_steps(engine, args.steps))
        engine.async_scheduling = True  # the default, whatever variant ran last
        if args.profile:
            emit(args, {"part": "profile", "batch": batch, "tp": tp, **(label or {}), **profile_steps(engine, args.device)})
        drain(engine)
        for name, values in measured.items():
            step_ms = min(values)
            rows.append({"batch": batch, "context": args.context, "tp": tp, "variant": name, "step_ms": step_ms,
                         "tokens_per_s": batch / step_ms * 1e3})
    return rows


def prefill_time(engine, args, variants: dict[str, dict]) -> list[dict]:
    rows = []
    vocab = engine.arch.vocab_size
    rng = random.Random(5)
    for name, flags in variants.items():
        use_variant(engine, flags)
        times = []
        for rep in range(4):
            engine.add_request(f"pf-{name}-{rep}", [rng.randrange(100, vocab - 100) for _ in range(args.prefill_len)],
                               SamplingParams(max_tokens=1))
            t0 = time.perf_counter()
            drain(engine)  # ends in sampling: a host sync
            times.append((time.perf_counter() - t0) * 1e3)
        rows.append({"prefill_len": args.prefill_len, "variant": name, "ms": min(times[1:])})
        if args.profile:  # where overlap's prefill time goes (it lost 27 ms in run 2)
            engine.add_request(f"pf-{name}-prof", [rng.randrange(100, vocab - 100) for _ in range(args.prefill_len)],
                               SamplingParams(max_tokens=1))
            emit(args, {"part": "profile", "phase": "prefill", "variant": name,
                        **profile_steps(engine, args.device, num_steps=1)})
            drain(engine)
    return rows


def graph_time_ms(fn, repeats: int) -> float:
    """Mean device time of `fn` over back-to-back replays of it captured in a CUDA graph (compiled first,
    outside the capture): GPU time alone, no launch from the host."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / repeats
