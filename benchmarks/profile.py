"""Where an engine's step goes, for the benchmarks (`benchmarks/parallel.py --profile`).

  profile_steps  the driver rank's device time per step by kernel (torch.profiler), the top ones,
                 the device's busy time, the step's wall time, and `host_split`
  host_split     the host phases of the driver's step (schedule / launch / finish / read back and,
                 inside them, the step message, upload, forward, LM head, sampling), from cProfile's
                 record of the engine's public methods: measured from outside, nothing patched
"""
from __future__ import annotations

import cProfile
import inspect
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
    """Wall ms per step in each phase of the driver's step, by cProfile (a deterministic profiler: each
    Python call pays about a microsecond, so the phases read high against an unprofiled step; compare
    them with each other): schedule; launch (the executor's `launch_forward` or the synchronous
    `execute`: plan, step message, upload, forward and LM head queued; with one stage also the
    sampling, and the synchronous engine's whole step but the emit); finish (pp: the previous batch's
    rows waited for, sampled); read_back (the engine waiting for a launched step's tokens, putting them
    in place, detokenizing); the rest. `in_launch` names parts of launch and finish (the step message
    to the other ranks, upload, forward, LM head, sampling)."""
    from cluster.engine.runner import ModelRunner, PendingStep
    from cluster.engine.stop import TextState
    from cluster.parallel.handles import HostGroup
    from cluster.parallel.step_channel import StepChannel

    executor = type(engine.executor)
    phases = {"schedule": [type(engine.scheduler).schedule], "launch": [executor.execute, executor.launch_forward],
              "finish": [executor.finish]}
    inner = {"broadcast": [StepChannel.send, HostGroup.broadcast], "upload": [ModelRunner.upload],
             "forward": [ModelRunner.forward], "logits": [type(engine.model).compute_logits],
             "sample": [ModelRunner.sample_async]}
    read_back = {_code(f) for f in (PendingStep.result, type(engine.scheduler).resolve, TextState.push)}
    profiler = cProfile.Profile()
    t0 = time.perf_counter()
    profiler.enable()
    try:
        for _ in range(num_steps):
            engine.step()
    finally:
        profiler.disable()
    total = time.perf_counter() - t0
    entries = profiler.getstats()
    spent = {name: _inclusive_s(entries, fns) for name, fns in phases.items()}
    # called by the engine's own loop (engine/engine.py), not inside the executor's or runner's launch
    spent["read_back"] = sum(sub.totaltime for entry in entries if _file(entry.code).endswith("engine/engine.py")
                             for sub in entry.calls or () if sub.code in read_back)
    spent["rest"] = total - sum(spent.values())
    return ({k: v / num_steps * 1e3 for k, v in spent.items()}
            | {"in_launch": {k: _inclusive_s(entries, fns) / num_steps * 1e3 for k, fns in inner.items()}})


def _code(fn):
    """The function's own code object (past decorators such as torch.inference_mode, which wrap it)."""
    return getattr(inspect.unwrap(fn), "__code__", None)


def _file(code) -> str:
    return getattr(code, "co_filename", "")


def _inclusive_s(entries, fns) -> float:
    """Seconds spent in any of `fns`, callees included (cProfile's cumulative time)."""
    codes = {_code(f) for f in fns} - {None}
    return sum(entry.totaltime for entry in entries if entry.code in codes)
