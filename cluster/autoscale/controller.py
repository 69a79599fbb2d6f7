"""The autoscaler's loop: every `autoscale.interval_s`,
  (1) observe each pool: its serving instances' last heartbeat (queued prompt tokens, prefill rate,
      running sequences, decode step, KV use), its scale-ups pending and instances draining (the
      actuator's), requests and prompt tokens placed on it since the last round (the router's
      counts), and TTFT/ITL at the SLO percentile as clients saw them (runtime/latency.py);
  (2) decide (policy.py: a pure function);
  (3) report: metrics (desired / pending / actual / draining instances, decisions by direction and
      reason, predicted and observed TTFT/ITL, GPUs held) and the last decisions for
      `GET /admin/autoscaler`;
  (4) act (actuator.py), unless the mode is `advisory`.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time

from cluster.autoscale.actuator import Actuator
from cluster.autoscale.observe import InstanceSample, Observations, PoolObservation
from cluster.autoscale.policy import Decision, PolicyState, decide
from cluster.config import ClusterConfig
from cluster.types import Role

log = logging.getLogger(__name__)
HISTORY = 64  # decisions kept for /admin/autoscaler


class Autoscaler:
    def __init__(self, cluster, config: ClusterConfig, metrics=None):
        self.cluster = cluster  # runtime.launcher.Cluster, started
        self.config = config
        self.autoscale, self.slo = config.autoscale, config.slo
        self.metrics = metrics
        self.model = cluster.client.info().name
        self.actuator = Actuator(cluster, self.autoscale.drain_timeout_s, metrics, self.model)
        self.state = PolicyState()
        self.roles = (Role.PREFILL, Role.DECODE) if config.disaggregated else (Role.MIXED,)
        self.seen: dict[str, tuple[int, int]] = {}  # instance id -> (requests, prompt tokens) counted so far
        self.finished_seen = {role: (0, 0) for role in Role}  # (legs, output tokens) finished, counted so far
        self.last_s = time.monotonic()
        self.history: collections.deque = collections.deque(maxlen=HISTORY)
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.run())

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.autoscale.interval_s)
            try:
                self.step()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bad round must not end the autoscaler
                log.exception("autoscaler round")

    def step(self, now_s: float | None = None) -> Decision:
        """(1)-(4) once."""
        now = time.monotonic() if now_s is None else now_s
        observations = self.observe(now)
        decision = decide(observations, self.state, self.autoscale, self.slo)
        self.state = decision.state
        self._report(observations, decision)
        if self.autoscale.mode == "act":
            self.actuator.apply(decision)
        return decision

    # -- (1) ------------------------------------------------------------------------------
    def observe(self, now_s: float) -> Observations:
        elapsed, self.last_s = max(now_s - self.last_s, 1e-3), now_s
        return Observations(now_s, {role: self._observe_pool(role, now_s, elapsed) for role in self.roles})

    def _observe_pool(self, role: Role, now_s: float, elapsed_s: float) -> PoolObservation:
        client = self.cluster.client
        views = [v for v in client.instances.values() if v.role == role and v.alive]
        requests = tokens = 0
        for view in views:
            before = self.seen.get(view.instance_id, (0, 0))
            requests += view.num_dispatched - before[0]
            tokens += view.num_dispatched_tokens - before[1]
            self.seen[view.instance_id] = (view.num_dispatched, view.num_dispatched_tokens)
        serving = [v for v in views if not v.draining]
        samples = tuple(InstanceSample(v.instance_id, int(v.load.get("num_queued_prefill_tokens", 0)) + v.dispatched_tokens,
                                       v.prefill_rate, int(v.load.get("num_running", 0)),
                                       v.load.get("mean_decode_step_ms"), float(v.load.get("kv_usage", 0.0)))
                        for v in serving)
        pool = {Role.PREFILL: self.config.prefill, Role.DECODE: self.config.decode, Role.MIXED: self.config.mixed}[role]
        legs, outputs = client.finished_tokens[role]
        before = self.finished_seen[role]
        self.finished_seen[role] = (legs, outputs)
        mean_output = (outputs - before[1]) / (legs - before[0]) if legs > before[0] else None
        p = self.slo.percentile
        return PoolObservation(
            role, samples, self.actuator.pending_ages_s(role, now_s), self.actuator.num_draining(role),
            requests / elapsed_s, tokens / elapsed_s, tokens / requests if requests else 0.0,
            client.latency.quantile(role, "ttft", p) if role != Role.DECODE else None,
            client.latency.quantile(role, "itl", p) if role != Role.PREFILL else None,
            pool.num_gpus_per_rank * pool.tp * pool.pp, mean_output, self.actuator.scale_out_s(role))

    # -- (3) ------------------------------------------------------------------------------
    def _report(self, observations: Observations, decision: Decision) -> None:
        for role, d in decision.pools.items():
            obs = observations.pools[role]
            self.history.append({"at_s": round(decision.now_s, 3), "pool": role.value, "direction": d.direction.value,
                                 "count": d.count, "reason": d.reason.value, "desired": d.desired,
                                 "actual": obs.num_actual, "pending": obs.num_pending, "draining": obs.num_draining,
                                 "predicted_ttft_s": d.predicted_ttft_s, "predicted_itl_s": d.predicted_itl_s,
                                 "observed_ttft_s": obs.observed_ttft_s, "observed_itl_s": obs.observed_itl_s,
                                 "flip_to": d.flip_to.value if d.flip_to else None, "acted": self.autoscale.mode == "act"})
            if d.direction.value != "hold":
                log.info("autoscaler: %s %s %d (%s): desired %d", role.value, d.direction.value, d.count,
                         d.reason.value, d.desired)
        if self.metrics is not None:
            self._export(observations, decision)

    def _export(self, observations: Observations, decision: Decision) -> None:
        m, model = self.metrics, self.model
        gpus = 0.0
        for role, d in decision.pools.items():
            obs, pool = observations.pools[role], role.value
            for state, value in (("desired", d.desired), ("pending", obs.num_pending), ("actual", obs.num_actual),
                                 ("draining", obs.num_draining)):
                m.autoscaler_instances.labels(model, pool, state).set(value)
            m.autoscaler_decisions.labels(model, pool, d.direction.value, d.reason.value).inc()
            for slo, predicted, observed in (("ttft", d.predicted_ttft_s, obs.observed_ttft_s),
                                             ("itl", d.predicted_itl_s, obs.observed_itl_s)):
                for source, value in (("predicted", predicted), ("observed", observed)):
                    if value is not None and value != float("inf"):
                        m.autoscaler_latency.labels(model, pool, slo, source).set(value)
            gpus += obs.gpus_held
        m.autoscaler_gpus.labels(model).set(gpus)

    def status(self) -> dict:
        """`GET /admin/autoscaler`: the mode, the targets and the last decisions with their reasons."""
        return {"enabled": True, "mode": self.autoscale.mode, "interval_s": self.autoscale.interval_s,
                "slo": {"ttft_s": self.slo.ttft_s, "itl_s": self.slo.itl_s, "percentile": self.slo.percentile},
                "max_gpus": self.autoscale.max_gpus, "requests_migrated": self.actuator.num_migrated,
                "scale_outs": list(self.actuator.scale_outs)[::-1],
                "decisions": list(self.history)[::-1]}

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
        await self.actuator.close()
