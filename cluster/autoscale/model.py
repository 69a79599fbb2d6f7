"""A pool's latency model, fitted online from what the pool reports: no offline profiling.

Prefill (TTFT). Each instance reports the prompt tokens/s it reaches when prompts queue (`mu`, the
median of recent rates). With `N` instances, prompt tokens arriving at `lam` per second and the
pool's queue `Q` tokens now, a prompt of `L` tokens waits for the queue ahead of it and its own run:

    rho = lam / (N mu)                         (>= 1: the queue only grows: TTFT unbounded)
    TTFT(N) ~ L/mu + Q/(N mu) + z * (L/mu) * rho / (2 (1 - rho))

the last term the M/D/1 queueing wait, stretched by `z = ln(1 / (1 - p))` to the SLO percentile p.
Sizing uses the steady part (no `Q`) and, apart, how soon a queue built up drains, `Q / (N mu - lam)`:
sized to clear a burst's backlog at once, the pool would grow to many times what the load needs by
the time the new instances serve.

Decode (ITL). A decode step costs `a + b * B` ms at a batch of `B` running sequences (weights read
once a step, KV and sampling per sequence): `a`, `b` are a least-squares fit with forgetting over
the (running sequences, mean decode step) pairs of every instance's heartbeats. The batch is not
fixed when the pool resizes: the pool must still produce the `T` tokens/s it produces now (sum of
running / step time), and a sequence stays as long as its tokens take (Little's law), so at `N`
instances the pool runs `C = T * step / 1000` sequences with `step = a + b * C / N`:

    C(N) = T a / (1000 - T b / N),   ITL(N) = a + b C(N) / N        (denominator <= 0: unbounded)

What the pool produces now lags a burst (sequences accumulate over their whole output), so `T` is at
least what arrives: requests/s placed on the pool times the tokens a request has been taking
(`tokens_per_request`: the output tokens of the requests that finished, or, before any finished,
T over the arrival rate, learnt while the rate holds steady).

KV: the pool holds `U` instances' worth of KV now, for `C` sequences; at `N` instances each holds
`U * C(N) / C / N`, which must stay under `KV_LIMIT`.

Calibration. What the formulas leave out (network, scheduling granularity, a percentile's tail)
is learnt as a ratio: `bias = EWMA(observed / predicted)` at the current size, applied to every
prediction (clipped to [1/4, 4]). Only while the pool's size holds (nothing pending or draining,
the same size as at the last observation): latencies observed across a resize belong to the old size.
All state is a frozen dataclass; `update` returns a new one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

from cluster.autoscale.observe import PoolObservation

KV_LIMIT = 0.9  # a pool is full past this share of its KV blocks
FORGET = 0.9  # weight of the past in the step fit, per decision
BIAS_ALPHA = 0.3  # weight of the newest observed/predicted ratio
BIAS_RANGE = (0.25, 4.0)
INF = float("inf")


@dataclass(frozen=True)
class PoolModel:
    prefill_rate: float | None = None  # tokens/s one instance prefills (median of the instances' rates)
    # decayed sums of the step fit: weight, x, y, x^2, xy (x: running sequences, y: decode step ms)
    sw: float = 0.0
    sx: float = 0.0
    sy: float = 0.0
    sxx: float = 0.0
    sxy: float = 0.0
    ttft_bias: float = 1.0
    itl_bias: float = 1.0
    num_samples: int = 0
    last_size: int = -1  # serving instances at the last observation
    slope_ms: float | None = None  # the step's cost per sequence, kept from the last fit that had a spread
    tokens_per_request: float | None = None  # decode: tokens a request takes (learnt at steady arrivals)
    last_arrivals_per_s: float = 0.0

    # -- fitting ---------------------------------------------------------------------
    def update(self, obs: PoolObservation, percentile: float) -> "PoolModel":
        """The model after one more observation of its pool (at the size it had then)."""
        model = self
        rates = sorted(i.prefill_tokens_per_s for i in obs.instances if i.prefill_tokens_per_s)
        if rates:
            model = replace(model, prefill_rate=rates[len(rates) // 2])
        steps = [(i.num_running, i.mean_decode_step_ms) for i in obs.instances if i.mean_decode_step_ms and i.num_running]
        if steps:
            sw, sx, sy, sxx, sxy = (v * FORGET for v in (model.sw, model.sx, model.sy, model.sxx, model.sxy))
            for x, y in steps:
                sw, sx, sy, sxx, sxy = sw + 1, sx + x, sy + y, sxx + x * x, sxy + x * y
            model = replace(model, sw=sw, sx=sx, sy=sy, sxx=sxx, sxy=sxy)
            slope = model._fitted_slope()
            if slope is not None:
                model = replace(model, slope_ms=slope)
        produced = _tokens_per_s(obs)
        steady = obs.arrivals_per_s > 0 and abs(obs.arrivals_per_s - model.last_arrivals_per_s) <= 0.2 * obs.arrivals_per_s
        if obs.mean_output_tokens:  # what finished requests took: the direct measure
            per = obs.mean_output_tokens
            old = model.tokens_per_request
            model = replace(model, tokens_per_request=per if old is None else (1 - BIAS_ALPHA) * old + BIAS_ALPHA * per)
        elif steady and produced:
            per = produced / obs.arrivals_per_s
            old = model.tokens_per_request
            model = replace(model, tokens_per_request=per if old is None else (1 - BIAS_ALPHA) * old + BIAS_ALPHA * per)
        model = replace(model, last_arrivals_per_s=obs.arrivals_per_s)
        n = obs.num_actual
        settled = n == self.last_size and not obs.num_pending and not obs.num_draining
        if settled and obs.observed_ttft_s is not None:
            raw = model._raw_ttft(obs, n, percentile)
            if 0 < raw < INF:
                model = replace(model, ttft_bias=_blend(model.ttft_bias, obs.observed_ttft_s / raw))
        if settled and obs.observed_itl_s is not None:
            raw = model._raw_itl(obs, n)
            if raw is not None and raw > 0:
                model = replace(model, itl_bias=_blend(model.itl_bias, obs.observed_itl_s / raw))
        return replace(model, num_samples=model.num_samples + 1, last_size=n)

    # -- predicting ------------------------------------------------------------------
    def step_fit(self) -> tuple[float, float] | None:
        """(a, b) of step_ms = a + b * batch; None until there is a fit. With too little spread in the
        batches seen now (a steady load), the slope is the last one fitted; before any, half the mean
        step is taken as per-sequence cost: pessimistic for consolidation (half the instances are then
        predicted to be unbounded), and more instances are predicted to help, as once a step is KV-bound."""
        if self.sw < 1:
            return None
        mean_x, mean_y = self.sx / self.sw, self.sy / self.sw
        b = self._fitted_slope()
        if b is None:
            b = self.slope_ms if self.slope_ms is not None else mean_y / 2 / max(mean_x, 1.0)
        return max(0.0, mean_y - b * mean_x), b

    def _fitted_slope(self) -> float | None:
        mean_x, mean_y = self.sx / self.sw, self.sy / self.sw
        var = self.sxx / self.sw - mean_x * mean_x
        if var <= 1e-6 * max(1.0, mean_x * mean_x):
            return None
        return max(0.0, (self.sxy / self.sw - mean_x * mean_y) / var)

    def predict_ttft(self, obs: PoolObservation, num_instances: int, percentile: float) -> float:
        return self.ttft_bias * self._raw_ttft(obs, num_instances, percentile)

    def steady_ttft(self, obs: PoolObservation, num_instances: int, percentile: float, load: float = 1.0) -> float:
        """TTFT once no backlog is left: the prompt's own run and the queueing of steady arrivals (`load`
        times those seen)."""
        return self.ttft_bias * self._raw_ttft(obs, num_instances, percentile, backlog=False, load=load)

    def backlog_drain_s(self, obs: PoolObservation, num_instances: int, load: float = 1.0,
                        queued: float | None = None) -> float:
        """Seconds until the queue (`queued` prompt tokens; default: the queue there is now) is gone once
        `num_instances` serve, arrivals going on (inf: it only grows)."""
        mu = self.prefill_rate
        queued = obs.num_queued_prefill_tokens if queued is None else queued
        if not queued:
            return 0.0
        spare = (num_instances * mu - load * obs.prompt_tokens_per_s) if mu else 0.0
        return queued / spare if spare > 0 else INF

    def backlog_when_serving(self, obs: PoolObservation, num_instances: int, start_s: float) -> float:
        """The prompt queue by the time `num_instances` serve: the instances beyond those serving now
        start later (the pending ones in what is left of `start_s`, new ones in all of it), and until
        they do the queue grows by what the serving instances cannot take. Sizing a burst's backlog
        on the queue seen now, a pool chases it: each decision finds it grown while its last scale-up
        starts, and adds again, to many times what the load needs."""
        queued = float(obs.num_queued_prefill_tokens)
        n_now, mu = obs.num_actual, self.prefill_rate
        if num_instances <= n_now or not mu:
            return queued
        ages = obs.pending_ages_s
        pending_left = sum(max(0.0, start_s - age) for age in ages) / len(ages) if ages else 0.0
        queued += max(0.0, obs.prompt_tokens_per_s - n_now * mu) * pending_left
        if num_instances > n_now + len(ages):  # new ones serve after the pending ones
            queued += max(0.0, obs.prompt_tokens_per_s - (n_now + len(ages)) * mu) * (start_s - pending_left)
        return queued

    def predict_itl(self, obs: PoolObservation, num_instances: int, load: float = 1.0) -> float | None:
        raw = self._raw_itl(obs, num_instances, load)
        return None if raw is None else self.itl_bias * raw

    def kv_share(self, obs: PoolObservation, num_instances: int, load: float = 1.0) -> float:
        """Each instance's share of its KV blocks in use at `num_instances` (inf: none would hold it)."""
        if num_instances <= 0:
            return INF if obs.kv_used else 0.0
        running = obs.num_running
        scaled = self._decode_at(obs, num_instances, load)
        grow = scaled[0] / running if scaled is not None and running else 1.0
        return obs.kv_used * grow / num_instances

    def _raw_ttft(self, obs: PoolObservation, n: int, percentile: float, backlog: bool = True,
                  load: float = 1.0) -> float:
        mu = self.prefill_rate
        if not mu or n <= 0:
            return INF if n <= 0 else 0.0
        rho = load * obs.prompt_tokens_per_s / (n * mu)
        if rho >= 1:
            return INF
        service = obs.mean_prompt_tokens / mu
        z = math.log(1.0 / (1.0 - percentile / 100.0))
        queue = obs.num_queued_prefill_tokens / (n * mu) if backlog else 0.0
        return service + queue + z * service * rho / (2 * (1 - rho))

    def _raw_itl(self, obs: PoolObservation, n: int, load: float = 1.0) -> float | None:
        state = self._decode_at(obs, n, load)
        return None if state is None else state[1] / 1e3

    def _decode_at(self, obs: PoolObservation, n: int, load: float = 1.0) -> tuple[float, float] | None:
        """(running sequences, step ms) of the pool at `n` instances, producing `load` times what it
        produces now."""
        fit = self.step_fit()
        if fit is None or n <= 0:
            return None
        a, b = fit
        tokens_per_s = _tokens_per_s(obs)
        if self.tokens_per_request:  # a burst's sequences arrive before they fill the batch
            tokens_per_s = max(tokens_per_s, obs.arrivals_per_s * self.tokens_per_request)
        tokens_per_s *= load
        if not tokens_per_s:
            return float(obs.num_running), a + b * obs.num_running / n
        room = 1000.0 - tokens_per_s * b / n
        if room <= 0:
            return INF, INF
        running = tokens_per_s * a / room
        return running, a + b * running / n


def _tokens_per_s(obs: PoolObservation) -> float:
    """Tokens the pool's decode produces a second now: each instance's batch over its step time."""
    return sum(i.num_running / (i.mean_decode_step_ms / 1e3) for i in obs.instances
               if i.num_running and i.mean_decode_step_ms)


def _blend(old: float, ratio: float) -> float:
    ratio = min(max(ratio, BIAS_RANGE[0]), BIAS_RANGE[1])
    return (1 - BIAS_ALPHA) * old + BIAS_ALPHA * ratio
