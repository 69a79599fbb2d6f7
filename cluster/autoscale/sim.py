"""Replay a load trace through the real policy against a model of the pools: a simulation, not a run.

It answers "what would the autoscaler do with this traffic, and what would it cost" in a second,
for tuning `autoscale:` and `slo:` before a deployment, and it is what the policy's trace tests and
benchmarks/autoscale_sim.py drive. The pools are fluids, one tick a second:

  prefill   prompt tokens arrive and queue; `N` instances drain `N * prefill_tokens_per_s` a
            second; a request arriving now waits for the queue ahead of it (the fluid's, within the
            second), for the random arrivals' queueing (an M/D/1 tail), then for its own prompt;
  decode    each request joins the running batch once prefilled and leaves after its output tokens;
            a step takes `step_ms(B) = a + b * B` at a batch of `B` per instance: the ITL. KV beyond an
            instance's capacity preempts (the ITL doubles while it does);
  mixed     both on the same instances, decode steps slowed by the share of time spent prefilling;
  scaling   a scale-up serves `start_s` after it is decided (pending until then); a scale-down
            drains (its instance is paid for `drain_s` more); a flip is a drain plus a role switch.
Each request's TTFT and ITL count against the SLO; GPU-seconds count every instance held.
Instead of the policy, a `plan` may give each pool's serving size second by second (a schedule, or an
oracle's sizing): an instance serving at `t` is paid from `t - start_s` to `t + drain_s`.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from cluster.autoscale.observe import InstanceSample, Observations, PoolObservation
from cluster.autoscale.policy import Decision, Direction, PolicyState, decide
from cluster.config import AutoscaleConfig, SloConfig
from cluster.types import Role


@dataclass(frozen=True)
class EngineModel:
    """One instance's speed (fit it to measured figures: docs/benchmarks.md)."""

    prefill_tokens_per_s: float = 40_000.0
    step_a_ms: float = 6.4  # decode step at batch 0: the weights read once
    step_b_ms: float = 0.045  # per running sequence
    kv_tokens: int = 400_000  # KV capacity of one instance
    start_s: float = 10.0  # decision -> serving
    drain_s: float = 5.0  # a drained instance is held this long after its scale-down
    gpus: float = 1.0


@dataclass(frozen=True)
class Load:
    """Traffic at one second: requests per second and their shape."""

    rate_per_s: float
    prompt_tokens: int = 1024
    output_tokens: int = 256


@dataclass
class _Pool:
    role: Role
    size: int
    pending: list[tuple[float, float]] = field(default_factory=list)  # (decided at, serves at) of each scale-up
    draining: list[float] = field(default_factory=list)  # when each drained instance is released
    queue_tokens: float = 0.0
    running: float = 0.0  # sequences in the decode batch
    scaled_out: bool = False  # a scale-up has served (the actuator has measured one's decision to serving)


@dataclass
class SimResult:
    num_requests: float = 0.0
    num_good: float = 0.0  # meeting both targets
    gpu_seconds: float = 0.0
    sizes: list[dict] = field(default_factory=list)  # per tick: role value -> serving instances
    gpus_held: list[float] = field(default_factory=list)  # per tick: serving, pending and draining instances' GPUs
    decisions: list[Decision] = field(default_factory=list)

    @property
    def attainment(self) -> float:
        return self.num_good / self.num_requests if self.num_requests else 1.0


def simulate(trace: list[Load], engine: EngineModel, slo: SloConfig, config: AutoscaleConfig | None,
             start: dict[Role, int], interval_s: float | None = None,
             on_decision: Callable[[Decision], None] | None = None,
             plan: list[dict[Role, int]] | None = None) -> SimResult:
    """Run `trace` (one Load a second). `config` None: the pools stay at `start` (static provisioning),
    or follow `plan` (one size per pool a second, as long as `trace`)."""
    pools = {role: _Pool(role, n) for role, n in start.items()}
    plan_held = _plan_held(plan, engine) if plan is not None else None
    state, result = PolicyState(), SimResult()
    interval = interval_s or (config.interval_s if config else 1.0)
    window: dict[Role, list[tuple[float, float]]] = {role: [] for role in pools}  # (TTFT, ITL) since the last decision
    arrived = {role: [0.0, 0.0] for role in pools}  # requests, prompt tokens since the last decision
    last_decision = 0.0
    for t, load in enumerate(trace):
        now = float(t)
        if plan is not None:
            for role, pool in pools.items():
                pool.size = plan[t][role]
        for pool in pools.values():
            served = sum(1 for _, serves in pool.pending if serves <= now)
            pool.size += served
            pool.scaled_out |= served > 0
            pool.pending = [p for p in pool.pending if p[1] > now]
            pool.draining = [s for s in pool.draining if s > now]
        ttft, itl = _tick(pools, load, engine)
        good = ttft <= slo.ttft_s and itl <= slo.itl_s
        result.num_requests += load.rate_per_s
        result.num_good += load.rate_per_s if good else 0.0
        held = (plan_held[t] if plan_held is not None
                else sum(p.size + len(p.pending) + len(p.draining) for p in pools.values()) * engine.gpus)
        result.gpu_seconds += held
        result.gpus_held.append(held)
        result.sizes.append({r.value: p.size for r, p in pools.items()})
        for role in pools:
            window[role].append((ttft, itl))
            arrived[role][0] += load.rate_per_s
            arrived[role][1] += load.rate_per_s * load.prompt_tokens
        if config is None or now - last_decision < interval:
            continue
        obs = Observations(now, {role: _observe(p, engine, load, window[role], arrived[role], now - last_decision, slo, now)
                                 for role, p in pools.items()})
        decision = decide(obs, state, config, slo)
        state = decision.state
        result.decisions.append(decision)
        if on_decision:
            on_decision(decision)
        _apply(decision, pools, engine, now)
        window = {role: [] for role in pools}
        arrived = {role: [0.0, 0.0] for role in pools}
        last_decision = now
    return result


def _plan_held(plan: list[dict[Role, int]], engine: EngineModel) -> list[float]:
    """GPUs a plan holds each second: per pool, the most it serves from `drain_s` before to `start_s`
    after (what serves at `s` started at `s - start_s` and is released at `s + drain_s`)."""
    before, after = math.ceil(engine.drain_s), math.ceil(engine.start_s)
    return [sum(max(sizes[role] for sizes in plan[max(0, t - before): t + after + 1]) for role in plan[t]) * engine.gpus
            for t in range(len(plan))]


def _tick(pools: dict[Role, _Pool], load: Load, engine: EngineModel) -> tuple[float, float]:
    """One second of traffic; the TTFT and ITL of the requests that arrived in it."""
    prefill = pools.get(Role.PREFILL) or pools[Role.MIXED]
    decode = pools.get(Role.DECODE) or pools[Role.MIXED]
    capacity = max(prefill.size, 0) * engine.prefill_tokens_per_s
    arriving = load.rate_per_s * load.prompt_tokens
    ttft = _ttft(prefill.queue_tokens, arriving, capacity, load.prompt_tokens / engine.prefill_tokens_per_s)
    prefill.queue_tokens += arriving
    busy_share = 0.0
    if prefill is decode:  # mixed: prefill takes its share of each instance's time first
        busy_share = min(1.0, prefill.queue_tokens / capacity) if capacity else 1.0
    done_tokens = min(prefill.queue_tokens, capacity)
    prefill.queue_tokens -= done_tokens
    decode.running += done_tokens / max(load.prompt_tokens, 1)
    batch = decode.running / decode.size if decode.size else math.inf
    step_ms = engine.step_a_ms + engine.step_b_ms * batch
    kv_per_instance = batch * (load.prompt_tokens + load.output_tokens / 2)
    if kv_per_instance > engine.kv_tokens:
        step_ms *= 2  # preemptions recompute
    if busy_share:
        step_ms /= max(1e-3, 1 - busy_share * 0.5)
    itl = step_ms / 1e3
    tokens_per_seq = 1.0 / itl if itl > 0 else 0.0
    decode.running = max(0.0, decode.running - decode.running * min(1.0, tokens_per_seq / max(load.output_tokens, 1)))
    return ttft, itl


def _ttft(queued: float, arriving: float, capacity: float, service_s: float, percentile: float = 95.0) -> float:
    """TTFT at `percentile` of the prompts arriving (evenly) over one second: the queue ahead of each
    (the fluid: what was left from before, growing or shrinking as arrivals outpace the pool or not),
    the random arrivals' own queueing, and the prompt's run. The queueing is an instance's M/D/1
    wait (Poisson arrivals, a fixed prompt): waiting with probability rho, and then, in heavy
    traffic, for an exponential time of mean E[W]/rho, E[W] = service * rho / (2 (1 - rho))."""
    if capacity <= 0:
        return math.inf
    if arriving >= capacity:
        mean_queue = queued + (arriving - capacity) / 2
    elif queued > (capacity - arriving):  # the queue shrinks all second long
        mean_queue = queued - (capacity - arriving) / 2
    else:  # gone at queued / (capacity - arriving) of the second
        mean_queue = queued * queued / (capacity - arriving) / 2
    rho = min(arriving / capacity, 0.99)
    tail = 1.0 - percentile / 100.0
    wait = service_s / (2 * (1 - rho)) * math.log(rho / tail) if rho > tail else 0.0
    return mean_queue / capacity + wait + service_s


def _observe(pool: _Pool, engine: EngineModel, load: Load, latencies: list[tuple[float, float]],
             arrived: list[float], elapsed_s: float, slo: SloConfig, now: float) -> PoolObservation:
    n = pool.size
    batch = pool.running / n if n else 0.0
    step_ms = engine.step_a_ms + engine.step_b_ms * batch
    kv = batch * (load.prompt_tokens + load.output_tokens / 2) / engine.kv_tokens
    samples = tuple(InstanceSample(f"{pool.role.value}-{i}", int(pool.queue_tokens / n) if n else 0,
                                   engine.prefill_tokens_per_s, int(round(batch)), step_ms if batch >= 0.5 else None,
                                   min(1.0, kv)) for i in range(n))
    prefill_side, decode_side = pool.role in (Role.PREFILL, Role.MIXED), pool.role in (Role.DECODE, Role.MIXED)
    ttft = _quantile([t for t, _ in latencies], slo.percentile) if latencies and prefill_side else None
    itl = _quantile([i for _, i in latencies], slo.percentile) if latencies and decode_side else None
    requests, tokens = arrived
    return PoolObservation(pool.role, samples, tuple(now - decided for decided, _ in pool.pending), len(pool.draining),
                           requests / elapsed_s if elapsed_s else 0.0, tokens / elapsed_s if elapsed_s else 0.0,
                           tokens / requests if requests else 0.0, ttft, itl, engine.gpus,
                           load.output_tokens if decode_side and pool.running else None,
                           engine.start_s if pool.scaled_out else None)


def _apply(decision: Decision, pools: dict[Role, _Pool], engine: EngineModel, now: float) -> None:
    for role, d in decision.pools.items():
        pool = pools[role]
        if d.direction == Direction.UP:
            pool.pending += [(now, now + engine.start_s)] * d.count
        elif d.direction == Direction.WITHDRAW:
            pool.pending = pool.pending[: max(0, len(pool.pending) - d.count)]
        elif d.direction == Direction.DOWN:
            count = min(d.count, pool.size)
            pool.size -= count
            pool.draining += [now + engine.drain_s] * count
        elif d.direction == Direction.FLIP and pool.size > 0 and d.flip_to in pools:
            pool.size -= 1
            pools[d.flip_to].pending.append((now, now + engine.drain_s))  # serves there once drained, weights kept


def _quantile(values: list[float], percentile: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * percentile / 100.0))]
