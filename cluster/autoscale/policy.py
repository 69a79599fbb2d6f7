"""The autoscaler's policy: a pure function from what the pools look like to what should change.

    decide(observations, state, config, slo) -> Decision   (Decision.state: the state for next time)

Per pool, in order (the first that applies is the pool's decision; each carries its reason):
  (1) WITHDRAW scale-ups pending longer than `pending_timeout_s` (they could not be placed);
  (2) UP to the pool's minimum (BELOW_MIN);
  (3) UP to the smallest size predicted to meet every target of the pool at `upscale_headroom` of
      it (prefill: TTFT; decode: ITL and KV room; mixed: both), counting scale-ups in flight, in one
      step however large the deficit (reason: the target that binds); a prompt backlog is sized as it
      will be when the new instances serve (it grows while they start), so later decisions of a
      burst find it as predicted and do not add again. Until the pool's model has
      `min_samples` observations (and, for decode, a measured cost per sequence of the step) it goes
      by the observed latency instead, in proportion to it;
  (4) WITHDRAW pending scale-ups the load no longer needs (LOAD_FELL), after `stable_window_s`
      without pressure, as any shrinking (a burst that pauses must not cancel what it started);
  (5) DOWN by one above the pool's maximum (ABOVE_MAX), or, with nothing draining, after
      `stable_window_s` without a scale-up or pressure (a prediction or observation over
      `downscale_margin` of a target, KV included), to the smallest size predicted to stay within
      `downscale_margin` of every target, KV included, at the highest arrival rate of the stable
      window: several instances at once when the load has clearly fallen (CONSOLIDATE); an idle
      pool, or one without a model, one at a time (IDLE at zero traffic);
  (6) HOLD.
Across pools: scale-ups share the GPU budget (`max_gpus`), the pool whose targets burn worst first;
a pool the budget leaves short may take an instance of the other disaggregated pool that could
consolidate (FLIP: drained, its role switched, its weights kept).
The gap between `upscale_headroom` and `downscale_margin` (it covers the model's error at the smaller
size: in the simulator the prefill model under-predicts it by up to 1.8x) and the stable window's
peak load (it covers the load's own noise and a burst that pauses) keep a steady load from flapping. The actuator (actuator.py) carries a decision out; in
`advisory` mode nothing is carried out.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field, replace

from cluster.autoscale.model import KV_LIMIT, PoolModel
from cluster.autoscale.observe import Observations, PoolObservation
from cluster.config import AutoscaleConfig, SloConfig
from cluster.types import Role

NEVER = -math.inf


class Direction(enum.Enum):
    UP = "up"
    DOWN = "down"
    WITHDRAW = "withdraw"  # cancel scale-ups in flight
    FLIP = "flip"  # give one instance to another pool
    HOLD = "hold"


class Reason(enum.Enum):
    BELOW_MIN = "below_min"
    ABOVE_MAX = "above_max"
    TTFT = "ttft"
    ITL = "itl"
    KV = "kv"
    PENDING_TIMEOUT = "pending_timeout"
    LOAD_FELL = "load_fell"
    CONSOLIDATE = "consolidate"
    IDLE = "idle"
    BUDGET = "budget"  # a FLIP, or an UP cut short by max_gpus
    STEADY = "steady"
    WARMING_UP = "warming_up"  # too few observations to predict, and nothing observed over target


@dataclass(frozen=True)
class PoolDecision:
    role: Role
    direction: Direction
    count: int
    reason: Reason
    desired: int  # the size the pool should have
    predicted_ttft_s: float | None = None  # at the pool's current size
    predicted_itl_s: float | None = None
    flip_to: Role | None = None  # FLIP: the pool that gets the instance
    burn: float = 0.0  # the worst of (prediction or observation) / target, at the current size


@dataclass(frozen=True)
class PoolState:
    model: PoolModel = field(default_factory=PoolModel)
    last_up_s: float = NEVER
    last_pressure_s: float = NEVER
    # (decided at, requests/s placed on the pool) of the decisions within the stable window
    recent_arrivals: tuple[tuple[float, float], ...] = ()

    def peak_arrivals_per_s(self) -> float:
        return max((rate for _, rate in self.recent_arrivals), default=0.0)


@dataclass(frozen=True)
class PolicyState:
    pools: dict[Role, PoolState] = field(default_factory=dict)


@dataclass(frozen=True)
class Decision:
    now_s: float
    pools: dict[Role, PoolDecision]
    state: PolicyState


def decide(observations: Observations, state: PolicyState, config: AutoscaleConfig, slo: SloConfig) -> Decision:
    now = observations.now_s
    decisions, states = {}, {}
    for role in sorted(observations.pools, key=_ORDER.index):  # prefill before decode: its backlog is decode's inflow
        obs = observations.pools[role]
        pool_state = state.pools.get(role, PoolState())
        recent = tuple(r for r in pool_state.recent_arrivals if now - r[0] < config.stable_window_s)
        pool_state = replace(pool_state, model=pool_state.model.update(obs, slo.percentile),
                             recent_arrivals=recent + ((now, obs.arrivals_per_s),))
        inflow = _decode_inflow(observations, decisions, states, config, slo) if role == Role.DECODE else 1.0
        decisions[role], states[role] = _decide_pool(obs, pool_state, _limits(config, role), config, slo, now, inflow)
    decisions, states = _share_budget(observations, decisions, states, config, slo)
    return Decision(now, decisions, PolicyState(states))


_ORDER = [Role.PREFILL, Role.DECODE, Role.MIXED]


def _decode_inflow(observations: Observations, decisions: dict, states: dict, config: AutoscaleConfig,
                   slo: SloConfig) -> float:
    """The load the decode pool must be sized for, as a multiple of what is placed on it now: a prompt
    backlog in the prefill pool reaches decode as fast as prefill clears it, on top of the arrivals
    (sized on arrivals alone, decode grows only once that backlog lands, and then one KV-full step at a
    time)."""
    prefill, decode = observations.pools.get(Role.PREFILL), observations.pools.get(Role.DECODE)
    if prefill is None or decode is None or not decode.arrivals_per_s:  # prefill, if any, was decided first
        return 1.0
    model, queued = states[Role.PREFILL].model, prefill.num_queued_prefill_tokens
    if not queued or not model.prefill_rate or not prefill.mean_prompt_tokens:
        return 1.0
    d = decisions[Role.PREFILL]
    serving = max(d.desired if d.direction == Direction.UP else prefill.num_actual + prefill.num_pending, 1)
    start_s = _Sizing(prefill, model, config, slo).start_s
    backlog = model.backlog_when_serving(prefill, serving, start_s)
    clear_s = model.backlog_drain_s(prefill, serving, queued=backlog)
    if clear_s == math.inf:
        return 1.0  # prefill is the bottleneck: decode sees no more than prefill lets through
    extra = backlog / prefill.mean_prompt_tokens / max(clear_s + start_s, config.interval_s)
    return 1.0 + extra / decode.arrivals_per_s


def _limits(config: AutoscaleConfig, role: Role):
    return {Role.PREFILL: config.prefill, Role.DECODE: config.decode, Role.MIXED: config.mixed}[role]


class _Sizing:
    """What one pool's model says of sizes: predictions, and the smallest size meeting a share of the targets."""

    def __init__(self, obs: PoolObservation, model: PoolModel, config: AutoscaleConfig, slo: SloConfig):
        self.obs, self.model, self.config, self.slo = obs, model, config, slo
        self.warming = model.num_samples < config.min_samples  # until then: sized by what is observed
        # a decode step whose cost per sequence was never measured (one steady batch has no spread to fit
        # it from) grows by what is observed too: the fallback slope keeps consolidation and flips
        # cautious, it is not a reason to grow a pool
        self.ttft = obs.role in (Role.PREFILL, Role.MIXED)
        self.itl = obs.role in (Role.DECODE, Role.MIXED)
        self.unmeasured_step = self.itl and model.slope_ms is None
        # how long a scale-up takes to serve: as measured, else (none measured yet) by the next
        # decision, or the oldest pending one's age by then
        self.start_s = obs.scale_out_s if obs.scale_out_s is not None else \
            max(obs.pending_ages_s, default=0.0) + config.interval_s

    def ttft_at(self, n: int) -> float | None:
        if not self.ttft or self.warming or not self.model.prefill_rate:
            return None
        return self.model.predict_ttft(self.obs, n, self.slo.percentile)

    def steady_ttft_at(self, n: int, load: float = 1.0) -> float | None:
        if not self.ttft or self.warming or not self.model.prefill_rate:
            return None
        return self.model.steady_ttft(self.obs, n, self.slo.percentile, load)

    def itl_at(self, n: int, load: float = 1.0) -> float | None:
        return None if not self.itl or self.warming else self.model.predict_itl(self.obs, n, load)

    def meets(self, n: int, share: float, load: float = 1.0, growing: bool = False) -> Reason | None:
        """None if `n` instances are predicted within `share` of every target (and their KV within
        `share` of the pool's limit), at `load` times the load seen; else the first target missed.
        `growing`: the backlog to clear is the one there will be when the `n` serve, not the one now."""
        ttft, itl = self.steady_ttft_at(n, load), self.itl_at(n, load)
        queued = self.model.backlog_when_serving(self.obs, n, self.start_s) if growing and ttft is not None else None
        if ttft is not None and (ttft > share * self.slo.ttft_s or self.model.backlog_drain_s(self.obs, n, load, queued)
                                 > self.config.backlog_drain_s * share):
            return Reason.TTFT
        if itl is not None and itl > share * self.slo.itl_s:
            return Reason.ITL
        if self.itl and self.model.kv_share(self.obs, n, load) > KV_LIMIT * share:
            return Reason.KV
        return None

    def observed_burn(self) -> tuple[float, Reason]:
        burns = [(0.0, Reason.STEADY)]
        if self.ttft and self.obs.observed_ttft_s is not None:
            burns.append((self.obs.observed_ttft_s / self.slo.ttft_s, Reason.TTFT))
        if self.itl and self.obs.observed_itl_s is not None:
            burns.append((self.obs.observed_itl_s / self.slo.itl_s, Reason.ITL))
        if self.itl and self.obs.num_actual:
            burns.append((self.obs.kv_used / self.obs.num_actual / KV_LIMIT, Reason.KV))
        return max(burns, key=lambda b: b[0])

    def predicted_burn(self, n: int) -> float:
        burns = [0.0]
        if (ttft := self.ttft_at(n)) is not None:
            burns.append(ttft / self.slo.ttft_s)
        if (itl := self.itl_at(n)) is not None:
            burns.append(itl / self.slo.itl_s)
            burns.append(self.model.kv_share(self.obs, n) / KV_LIMIT)  # a scale-up for KV is pressure too
        return max(burns)

    def needed(self, largest: int, inflow: float = 1.0) -> tuple[int, Reason | None]:
        """The smallest size (up to `largest`) within `upscale_headroom` of every target at `inflow`
        times the load placed now, and the target that binds at the current size (None: none)."""
        n_now = max(self.obs.num_actual, 1)
        headroom = self.config.upscale_headroom
        if self.warming or self.unmeasured_step:  # no model (of the step) yet: what is observed, in proportion
            burn, reason = self.observed_burn()
            if burn <= headroom:
                return self.obs.num_actual, None
            if self.obs.num_pending:  # what is observed cannot show the scale-ups on their way yet
                return self.obs.num_actual + self.obs.num_pending, None
            return min(largest, math.ceil(n_now * burn / headroom)), reason
        binding = self.meets(self.obs.num_actual, headroom, inflow) if self.obs.num_actual else None
        for n in range(1, largest + 1):
            if self.meets(n, headroom, inflow, growing=True) is None:
                return n, binding
        return largest, binding or Reason.TTFT


def _decide_pool(obs: PoolObservation, state: PoolState, limits, config: AutoscaleConfig, slo: SloConfig,
                 now: float, inflow: float = 1.0) -> tuple[PoolDecision, PoolState]:
    sizing = _Sizing(obs, state.model, config, slo)
    n_now, n_pending = obs.num_actual, obs.num_pending
    pressure = (sizing.observed_burn()[0] > config.downscale_margin
                or (obs.num_actual and sizing.predicted_burn(n_now) > config.downscale_margin))
    if pressure:
        state = replace(state, last_pressure_s=now)
    burn = max(sizing.observed_burn()[0], sizing.predicted_burn(n_now) if n_now else 0.0)

    def out(direction: Direction, count: int, reason: Reason, desired: int, new_state: PoolState = state):
        return PoolDecision(obs.role, direction, count, reason, desired, sizing.ttft_at(n_now) if n_now else None,
                            sizing.itl_at(n_now) if n_now else None, burn=burn), new_state

    timed_out = sum(age > config.pending_timeout_s for age in obs.pending_ages_s)
    if timed_out:  # (1) never placed: withdrawn, and forgotten (it must not hold a scale-down back)
        return out(Direction.WITHDRAW, timed_out, Reason.PENDING_TIMEOUT, n_now + n_pending - timed_out,
                   replace(state, last_up_s=NEVER))
    total = n_now + n_pending
    if total < limits.min_instances:  # (2)
        return out(Direction.UP, limits.min_instances - total, Reason.BELOW_MIN, limits.min_instances,
                   replace(state, last_up_s=now))
    needed, binding = sizing.needed(limits.max_instances, inflow)
    needed = max(needed, limits.min_instances)
    if needed > total and binding is not None:  # (3)
        return out(Direction.UP, needed - total, binding, needed, replace(state, last_up_s=now))
    calm = now - state.last_pressure_s >= config.stable_window_s
    if n_pending and needed < total and calm:  # (4)
        return out(Direction.WITHDRAW, min(n_pending, total - needed), Reason.LOAD_FELL, needed,
                   replace(state, last_up_s=NEVER))
    if n_now > limits.max_instances:  # (5)
        return out(Direction.DOWN, 1, Reason.ABOVE_MAX, limits.max_instances)
    smaller = _consolidate_to(sizing, state, limits, config, now)
    if smaller is not None:
        return out(Direction.DOWN, n_now - smaller, Reason.IDLE if obs.idle else Reason.CONSOLIDATE, smaller)
    return out(Direction.HOLD, 0, Reason.WARMING_UP if sizing.warming else Reason.STEADY, total)


def _consolidate_to(sizing: _Sizing, state: PoolState, limits, config: AutoscaleConfig, now: float) -> int | None:
    """The size to shrink to (None: none): the smallest that is predicted to hold the highest load of
    the stable window within `downscale_margin` of every target, KV included; an idle pool, or one
    without a model, one instance at a time."""
    obs = sizing.obs
    if obs.num_actual <= limits.min_instances or obs.num_draining or obs.num_pending:
        return None
    if now - max(state.last_up_s, state.last_pressure_s) < config.stable_window_s:
        return None
    if sizing.warming or obs.idle:  # nothing to size against: step by step
        return obs.num_actual - 1 if obs.idle else None
    load = _consolidation_load(state, obs)
    for n in range(max(limits.min_instances, 1), obs.num_actual):
        if sizing.meets(n, config.downscale_margin, load) is None:
            return n
    return None


def _consolidation_load(state: PoolState, obs: PoolObservation) -> float:
    """The load a smaller pool must hold, as a multiple of the load seen now: the highest of the
    stable window (a load that dipped may come back before a scale-up could serve it)."""
    if not obs.arrivals_per_s:
        return 1.0
    return max(1.0, state.peak_arrivals_per_s() / obs.arrivals_per_s)


def _share_budget(observations: Observations, decisions: dict, states: dict, config: AutoscaleConfig,
                  slo: SloConfig) -> tuple[dict, dict]:
    """Scale-ups within `max_gpus`, the worst-burning pool first; a pool left short may take an
    instance of the other disaggregated pool by a FLIP."""
    if config.max_gpus is None:
        return decisions, states
    pools = observations.pools
    free = config.max_gpus - sum(obs.gpus_held for obs in pools.values())
    ups = sorted((d for d in decisions.values() if d.direction == Direction.UP), key=lambda d: -d.burn)
    for d in ups:
        per = pools[d.role].gpus_per_instance
        granted = min(d.count, int((free + 1e-9) // per)) if per > 0 else d.count
        free -= granted * per
        if granted == d.count:
            continue
        decisions[d.role] = replace(d, count=granted, direction=Direction.UP if granted else Direction.HOLD,
                                    reason=d.reason if granted else Reason.BUDGET)
        if granted == 0 and config.role_flip:
            donor = _flip_donor(d.role, pools, decisions, states, config, slo)
            if donor is not None:
                decisions[donor] = replace(decisions[donor], direction=Direction.FLIP, count=1, reason=Reason.BUDGET,
                                           flip_to=d.role, desired=pools[donor].num_actual - 1)
    return decisions, states


def _flip_donor(role: Role, pools: dict, decisions: dict, states: dict, config: AutoscaleConfig,
                slo: SloConfig) -> Role | None:
    """The other disaggregated pool, if it holds an instance it could spare (of the same GPU shape)."""
    other = {Role.PREFILL: Role.DECODE, Role.DECODE: Role.PREFILL}.get(role)
    obs = pools.get(other)
    if obs is None or decisions[other].direction not in (Direction.HOLD, Direction.DOWN):
        return None
    if obs.gpus_per_instance != pools[role].gpus_per_instance or obs.num_draining or obs.num_pending:
        return None
    if obs.num_actual <= _limits(config, other).min_instances:
        return None
    sizing = _Sizing(obs, states[other].model, config, slo)
    if sizing.warming:
        return other if obs.idle else None
    load = _consolidation_load(states[other], obs)
    spare = sizing.meets(obs.num_actual - 1, config.downscale_margin, load) is None
    return other if spare else None
