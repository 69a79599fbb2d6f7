"""Where a decode step at one batch size goes, for an A/B of two trees (gpu_session.sh `decode-profile`):
each step's own time (synchronized, so a slow one shows), the host's share by function (cProfile over
unsynchronized steps, as the engine runs them), and the device's kernels (torch.profiler). It uses only
what both trees of an A/B have (`Engine.add_request/step/has_unfinished`, the scheduler's queues).

    python -m benchmarks.decode_profile --model /tmp/llama8b --batch 128 --out decode_profile.json
"""
from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import os
import pstats
import resource
import statistics
import time

import torch

from benchmarks.engine import _prompts
from cluster.runtime.gc_pauses import freeze_startup_objects


def _engine(args):
    from cluster.config import CacheConfig, EngineConfig, ModelConfig, RunnerConfig, SchedulerConfig
    from cluster.engine.engine import Engine

    on_gpu = args.device == "cuda"
    cfg = EngineConfig(
        model=ModelConfig(path=args.model, dtype="bfloat16" if on_gpu else "float32", max_model_len=args.max_model_len),
        cache=CacheConfig(gpu_memory_fraction=0.9, enable_prefix_caching=False, num_blocks=None if on_gpu else 2048),
        scheduler=SchedulerConfig(max_num_seqs=256, max_num_batched_tokens=8192),
        runner=RunnerConfig(device=args.device, enable_cuda_graphs=on_gpu and not args.no_cuda_graphs,
                            cuda_graph_max_batch=256))
    return Engine(cfg, progress=False)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _fill(engine, batch: int, context: int, vocab: int, steps: int, tag: str) -> int:
    """`batch` sequences prefilled to `context` tokens; returns the prefill steps it took."""
    from cluster.types import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=steps, ignore_eos=True)
    for i, p in enumerate(_prompts(batch, context, vocab, seed=batch)):
        engine.add_request(f"{tag}{i}", p, params)
    n = 0
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running + list(engine.scheduler.waiting)):
        engine.step()
        n += 1
    for _ in range(3):
        engine.step()
    return n


def _thread_cpu_s() -> dict[str, float]:
    """CPU seconds (user + system) each of this process's OS threads has used, by "name/tid"."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                stat = f.read()
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = f.read().strip()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        out[f"{name}/{tid}"] = (int(fields[11]) + int(fields[12])) / tick
    return out


def _process_facts() -> dict:
    """What could slow every host function alike: threads, intra-op threads, cores, the GIL's switch interval."""
    import sys
    import threading

    return {"python_threads": sorted(t.name for t in threading.enumerate()), "os_threads": len(os.listdir("/proc/self/task")),
            "torch_num_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
            "affinity_cores": len(os.sched_getaffinity(0)), "switch_interval_s": sys.getswitchinterval(),
            "omp_env": {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "MKL_", "KMP_", "GOMP_"))}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--no-cuda-graphs", action="store_true")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a dry run of the script itself")
    ap.add_argument("--out", default="decode_profile.json")
    args = ap.parse_args()
    from cluster.models.hf_config import load_arch_config

    vocab = load_arch_config(args.model).vocab_size
    engine = _engine(args)
    out = {"batch": args.batch, "context": args.context, "num_blocks": engine.kv.num_blocks,
           "async_scheduling": getattr(engine, "async_scheduling", None),
           "graph_sizes": list(getattr(getattr(engine.runner, "graphs", None), "sizes", []) or [])}
    # (1) each step synchronized: the spread shows a step that is not a plain decode step
    budget = 4 * args.steps + 16
    out["prefill_steps"] = _fill(engine, args.batch, args.context, vocab, budget, "a")
    times = []
    for _ in range(args.steps):
        _sync(args.device)
        t0 = time.perf_counter()
        engine.step()
        _sync(args.device)
        times.append((time.perf_counter() - t0) * 1e3)
    out["synced_step_ms"] = {"median": statistics.median(times), "min": min(times), "max": max(times), "all": times}
    # (2) as the engine runs: unsynchronized steps, timed whole, with Python's collector as it is (this
    # process froze nothing), off, and with start-up's objects frozen as an instance actor freezes them
    # (runtime/gc_pauses.py); then the host's functions under cProfile
    out["gc_tracked_objects"] = len(gc.get_objects())  # what a full collection walks, unfrozen
    for name, collect in (("step_ms", True), ("step_ms_gc_off", False), ("step_ms_frozen", True)):
        if name == "step_ms_frozen":  # as an instance actor runs: start-up's objects frozen
            freeze_startup_objects()
        if not collect:
            gc.disable()
        before = [g["collections"] for g in gc.get_stats()]
        _sync(args.device)
        cpu0, usage0 = _thread_cpu_s(), resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        _sync(args.device)
        out[name] = (time.perf_counter() - t0) * 1e3 / args.steps
        cpu1, usage1 = _thread_cpu_s(), resource.getrusage(resource.RUSAGE_SELF)
        # which threads used the CPU while the steps ran (a spinning one slows the stepping thread's Python)
        busy = {k: round((v - cpu0.get(k, 0.0)) * 1e3 / args.steps, 3) for k, v in cpu1.items() if v - cpu0.get(k, 0.0) > 0}
        out[name.replace("step_ms", "thread_cpu_ms_per_step")] = dict(sorted(busy.items(), key=lambda kv: -kv[1])[:12])
        out[name.replace("step_ms", "ctx_switches")] = {"voluntary": usage1.ru_nvcsw - usage0.ru_nvcsw,
                                                       "involuntary": usage1.ru_nivcsw - usage0.ru_nivcsw}
        out[name.replace("step_ms", "gc_collections")] = [g["collections"] - b for g, b in zip(gc.get_stats(), before)]
        gc.enable()
    out["process"] = _process_facts()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(8):
        engine.step()
    _sync(args.device)
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
    out["host_top_tottime"] = text.getvalue()[-6000:]
    # (3) the device's kernels over 5 steps
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
    with profile(activities=activities) as tp:
        for _ in range(5):
            engine.step()
        _sync(args.device)
    rows, busy = [], 0.0
    for ev in tp.key_averages():
        busy += getattr(ev, "self_device_time_total", 0) or 0
        rows.append((getattr(ev, "device_time_total", 0) or 0, ev.key[:90], ev.count))
    rows.sort(reverse=True)
    out["device_busy_ms_per_step"] = busy / 5 / 1e3
    out["top_kernels"] = [{"name": n, "us_per_step": us / 5, "calls_per_step": c / 5} for us, n, c in rows[:20]]
    while engine.has_unfinished():
        engine.step()
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps({k: v for k, v in out.items() if k not in ("host_top_tottime", "top_kernels")}
                     | {"synced_step_ms": {k: v for k, v in out["synced_step_ms"].items() if k != "all"}}))
    print(out["host_top_tottime"][:3000])
    for row in out["top_kernels"][:12]:
        print(f"{row['us_per_step']:10.1f} us  x{row['calls_per_step']:.0f}  {row['name']}")


if __name__ == "__main__":
    main()
