"""A SIMULATION of the autoscaler against static provisioning: the real policy (cluster/autoscale/policy.py)
replays load traces against a fluid model of the pools (cluster/autoscale/sim.py) fitted to measured
H100 figures of the Llama-3-8B shape (docs/benchmarks.md): a prefill of 39,400 prompt tokens/s (2k
tokens in 52 ms), a decode step of 6.44 ms at batch 1 and 12.1 ms at batch 128, 440k tokens of KV an
instance, and the scale-out time given (`--start-s`). Nothing here runs a GPU.

For each trace it prints SLO attainment (requests meeting both TTFT and ITL targets) and GPU-seconds of
  autoscaled       the policy, pools from their minimums;
  static peak      each pool the smallest size that meets the SLO at the trace's peak rate, all along;
  static mean      each pool the smallest size that meets it at the trace's mean rate;
  oracle           a bound, not a policy: each second each pool the smallest size that meets the SLO at
                   that second's rate (as static peak sizes it), every instance paid from `start_s`
                   before it serves to `drain_s` after (it knows the load ahead of time).

    python -m benchmarks.autoscale_sim --out benchmarks/results/autoscale_sim.json
"""
from __future__ import annotations

import argparse
import json
import math
import random

from cluster.autoscale.sim import EngineModel, Load, simulate
from cluster.config import AutoscaleConfig, PoolLimits, SloConfig
from cluster.types import Role

H100_8B = dict(prefill_tokens_per_s=39_400.0, step_a_ms=6.4, step_b_ms=(12.1 - 6.44) / 127, kv_tokens=440_000)


def burst_trace(base: float, factor: float, prompt: int, output: int) -> list[Load]:
    """10 min at `base` req/s, 5 min at `factor` x base, 10 min at base."""
    return ([Load(base, prompt, output)] * 600 + [Load(base * factor, prompt, output)] * 300
            + [Load(base, prompt, output)] * 600)


def day_trace(low: float, high: float, hours: float, prompt: int, output: int, seed: int = 0) -> list[Load]:
    """A day's shape compressed into `hours`: a night trough, a morning ramp, a lunch dip, an evening
    peak, with 10% noise a second."""
    rng, seconds = random.Random(seed), int(hours * 3600)
    loads = []
    for t in range(seconds):
        phase = t / seconds * 2 * math.pi
        shape = 0.5 - 0.5 * math.cos(phase) + 0.15 * math.sin(3 * phase)  # 0 at midnight, 1 mid-afternoon
        rate = low + (high - low) * min(1.0, max(0.0, shape))
        loads.append(Load(max(0.0, rate * rng.uniform(0.9, 1.1)), prompt, output))
    return loads


def static_size(trace_rate: float, prompt: int, output: int, engine: EngineModel, slo: SloConfig) -> dict[Role, int]:
    """The smallest (prefill, decode) sizes that meet the SLO for 10 minutes at `trace_rate` (prefill
    first at a generous decode, then decode at that prefill)."""
    load = [Load(trace_rate, prompt, output)] * 600

    def ok(p: int, d: int) -> bool:
        return simulate(load, engine, slo, None, {Role.PREFILL: p, Role.DECODE: d}).attainment >= 0.99

    prefill = next((p for p in range(1, 65) if ok(p, 64)), 64)
    decode = next((d for d in range(1, 65) if ok(prefill, d)), 64)
    return {Role.PREFILL: prefill, Role.DECODE: decode}


def size_limits(prompt: int, output: int, engine: EngineModel, slo: SloConfig, max_rate: float) -> dict[Role, list[float]]:
    """Per pool, the highest rate that 1, 2, ... instances hold by static_size's measure (the other
    pool generous), up to the first size that holds `max_rate`."""
    def holds(role: Role, n: int, rate: float) -> bool:
        sizes = {Role.PREFILL: 64, Role.DECODE: 64, role: n}
        return simulate([Load(rate, prompt, output)] * 600, engine, slo, None, sizes).attainment >= 0.99

    limits = {}
    for role in (Role.PREFILL, Role.DECODE):
        highest = []
        while not highest or highest[-1] < max_rate:
            n, low, high = len(highest) + 1, 0.0, max_rate
            if holds(role, n, high):
                highest.append(high)
                break
            for _ in range(24):
                mid = (low + high) / 2
                low, high = (mid, high) if holds(role, n, mid) else (low, mid)
            highest.append(low)
        limits[role] = highest
    return limits


def oracle_plan(trace: list[Load], limits: dict[Role, list[float]]) -> list[dict[Role, int]]:
    """Each second, each pool the smallest size whose highest rate covers that second's."""
    return [{role: next((n for n, rate in enumerate(highest, 1) if load.rate_per_s <= rate), len(highest))
             for role, highest in limits.items()} for load in trace]


def compare(name: str, trace: list[Load], engine: EngineModel, slo: SloConfig, config: AutoscaleConfig,
            warm_start: bool = True) -> dict:
    peak = max(load.rate_per_s for load in trace)
    mean = sum(load.rate_per_s for load in trace) / len(trace)
    prompt, output = trace[0].prompt_tokens, trace[0].output_tokens
    rows = {}
    for label, sizes in (("static peak", static_size(peak, prompt, output, engine, slo)),
                         ("static mean", static_size(mean, prompt, output, engine, slo))):
        result = simulate(trace, engine, slo, None, sizes)
        rows[label] = {"attainment": result.attainment, "gpu_seconds": result.gpu_seconds,
                       "sizes": {r.value: n for r, n in sizes.items()}}
    # a deployment that was already running: the pools as the first second's load needs them (from their
    # minimums the run would open on a scale-from-zero under full load, which is not what a trace measures)
    start = static_size(trace[0].rate_per_s, prompt, output, engine, slo) if warm_start else \
        {Role.PREFILL: config.prefill.min_instances, Role.DECODE: config.decode.min_instances}
    result = simulate(trace, engine, slo, config, start)
    sizes = [s for s in result.sizes]
    rows["autoscaled"] = {"attainment": result.attainment, "gpu_seconds": result.gpu_seconds,
                          "max_sizes": {r: max(s[r] for s in sizes) for r in ("prefill", "decode")},
                          "num_actions": sum(1 for d in result.decisions for p in d.pools.values()
                                             if p.direction.value != "hold")}
    rows["autoscaled"]["gpu_seconds_vs_static_peak"] = result.gpu_seconds / rows["static peak"]["gpu_seconds"]
    plan = oracle_plan(trace, size_limits(prompt, output, engine, slo, peak))
    oracle = simulate(trace, engine, slo, None, start, plan=plan)
    rows["oracle"] = {"attainment": oracle.attainment, "gpu_seconds": oracle.gpu_seconds,
                      "gpu_seconds_vs_static_peak": oracle.gpu_seconds / rows["static peak"]["gpu_seconds"],
                      "max_sizes": {r.value: max(p[r] for p in plan) for r in (Role.PREFILL, Role.DECODE)}}
    return {"trace": name, "seconds": len(trace), "peak_rate": peak, "mean_rate": mean, **rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--start-s", type=float, default=10.0, help="scale-out time, decision to serving")
    ap.add_argument("--ttft-s", type=float, default=1.0)
    ap.add_argument("--itl-s", type=float, default=0.05)
    ap.add_argument("--interval-s", type=float, default=5.0)
    ap.add_argument("--stable-window-s", type=float, default=120.0)
    ap.add_argument("--scale", type=float, default=1.0,
                    help="every rate of both traces times this: 10 sizes the pools in tens of GPUs, where the "
                         "one-instance minimum of each pool no longer costs half of static peak at the trough")
    ap.add_argument("--backlog-drain-s", type=float, default=AutoscaleConfig.backlog_drain_s)
    ap.add_argument("--cold-start", action="store_true",
                    help="the autoscaled pools start at their minimums (1 each) under the trace's first load, not "
                         "at the sizes that load needs")
    ap.add_argument("--out", default="autoscale_sim.json")
    args = ap.parse_args()
    k = args.scale
    engine = EngineModel(**H100_8B, start_s=args.start_s, drain_s=10.0)
    slo = SloConfig(ttft_s=args.ttft_s, itl_s=args.itl_s, percentile=95.0)
    config = AutoscaleConfig(enabled=True, interval_s=args.interval_s, stable_window_s=args.stable_window_s,
                             prefill=PoolLimits(1, 64), decode=PoolLimits(1, 64), backlog_drain_s=args.backlog_drain_s)
    results = [compare(f"4x burst ({10 * k:g} -> {40 * k:g} req/s, 2k in / 256 out)", burst_trace(10.0 * k, 4.0, 2048, 256),
                       engine, slo, config, not args.cold_start),
               compare(f"day-shaped ({8 * k:g} -> {160 * k:g} req/s over 2 h, 1k in / 256 out)",
                       day_trace(8.0 * k, 160.0 * k, 2.0, 1024, 256), engine, slo, config, not args.cold_start)]
    out = {"simulation": True, "engine_model": H100_8B, "start_s": args.start_s, "scale": k,
           "backlog_drain_s": args.backlog_drain_s, "cold_start": args.cold_start,
           "slo": {"ttft_s": args.ttft_s, "itl_s": args.itl_s, "percentile": 95.0}, "results": results}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print("SIMULATION (policy against a fluid model of H100 pools; not a run)")
    for r in results:
        print(f"\n{r['trace']}: {r['seconds']} s, peak {r['peak_rate']:.1f} req/s, mean {r['mean_rate']:.1f}")
        for label in ("autoscaled", "oracle", "static peak", "static mean"):
            row = r[label]
            if label == "autoscaled":
                extra = (f"  ({row['gpu_seconds_vs_static_peak']:.1%} of static peak's GPU-seconds, "
                         f"{row['num_actions']} actions, max {row['max_sizes']})")
            elif label == "oracle":
                extra = f"  ({row['gpu_seconds_vs_static_peak']:.1%} of static peak's: the bound; max {row['max_sizes']})"
            else:
                extra = f"  (sizes {row['sizes']})"
            print(f"  {label:12s} attainment {row['attainment']:.1%}  GPU-seconds {row['gpu_seconds']:,.0f}{extra}")


if __name__ == "__main__":
    main()
