"""Where an engine's step goes, for the benchmarks (`benchmarks/parallel.py --profile`).

  profile_steps  the driver rank's device time per step by kernel (torch.profiler), the top ones,
                 the device's busy time, the step's wall time, and `host_split`
  host_split     the host phases of the driver's step, timed unprofiled by wrapping the engine's
                 schedule / execute / sample / upload / forward / LM head / step message in place
"""
from __future__ import annotations

import time


def profile_steps(engine, device: str, num_steps: int = 5) -> dict:
    """The driver rank's device time per step by kernel (torch.profiler), the top ones, plus the
    step's wall time and its host phases (`host_split`): where a step's time goes beyond the weights' read.
    On CPU only the host phases and the wall time: there is no device to profile (and torch.profiler's
    CPU-only start crashed a CI run's process once, SIGSEGV in kineto)."""
    host = host_split(engine, num_steps)
    if device != "cuda":
        t0 = time.perf_counter()
        for _ in range(num_steps):
            engine.step()
        return {"wall_ms_per_step": (time.perf_counter() - t0) / num_steps * 1e3, "device_busy_ms_per_step": None,
                "host_ms_per_step": host, "top": []}
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(num_steps):
            engine.step()
    wall_ms = (time.perf_counter() - t0) / num_steps * 1e3
    rows, busy_us = [], 0.0
    for event in prof.key_averages():
        device_us = getattr(event, "device_time_total", 0) or getattr(event, "cuda_time_total", 0)
        busy_us += getattr(event, "self_device_time_total", 0) or 0  # kernels only: CPU ops have no self device time
        rows.append((device_us, event.key, event.count))
    rows.sort(reverse=True)
    top = [{"name": name[:80], "us_per_step": us / num_steps, "calls_per_step": count / num_steps}
           for us, name, count in rows[:15]]
    return {"wall_ms_per_step": wall_ms, "device_busy_ms_per_step": busy_us / num_steps / 1e3, "host_ms_per_step": host,
            "top": top}


def host_split(engine, num_steps: int) -> dict:
    """Wall ms per step in each phase of the driver's step, unprofiled: schedule; launch (plan,
    broadcast, upload, forward and LM head queued; with one stage also the sampling queued);
    finish (pp: the previous batch's rows waited for, sampled); read_back (waits for the launched
    step's tokens, then update, detokenize, emit; the synchronous engine's `execute` counts as
    launch and does all of it but the emit); the rest. `in_launch` names parts of launch and finish
    (host broadcast to the other ranks, upload, forward, LM head, sampling)."""
    spent = {"schedule": 0.0, "launch": 0.0, "finish": 0.0, "read_back": 0.0}
    inner = {"broadcast": 0.0, "upload": 0.0, "forward": 0.0, "logits": 0.0, "sample": 0.0}
    wrapped = []

    def timed(obj, name, key):
        original = getattr(obj, name)

        def run(*a, **kw):
            t = time.perf_counter()
            try:
                return original(*a, **kw)
            finally:
                (spent if key in spent else inner)[key] += time.perf_counter() - t
        object.__setattr__(obj, name, run)  # frozen dataclasses too (HostGroup)
        wrapped.append((obj, name))

    timed(engine.scheduler, "schedule", "schedule")
    timed(engine.executor, "execute", "launch")  # the synchronous engine
    timed(engine.executor, "launch_forward", "launch")
    timed(engine.executor, "finish", "finish")
    timed(engine, "_read_back", "read_back")
    timed(engine.runner, "sample_async", "sample")
    timed(engine.runner, "upload", "upload")
    timed(engine.runner, "forward", "forward")
    timed(engine.model, "compute_logits", "logits")
    if hasattr(engine.executor, "_tell"):  # the step's message to the other ranks
        timed(engine.executor, "_tell", "broadcast")
    t0 = time.perf_counter()
    try:
        for _ in range(num_steps):
            engine.step()
    finally:
        for obj, name in wrapped:
            object.__delattr__(obj, name)
    total = time.perf_counter() - t0
    spent["rest"] = total - sum(spent.values())
    return {k: v / num_steps * 1e3 for k, v in spent.items()} | {"in_launch": {k: v / num_steps * 1e3 for k, v in inner.items()}}
