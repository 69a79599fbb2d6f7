"""Carries the policy's decisions out on Ray, through the runtime's `Cluster` (launch, join, release,
switch_role); the only part of the autoscaler that acts.

  UP        `launch` an instance: its placement group is pending until Ray has room, and that pending
            group is what makes Ray's autoscaler (or KubeRay's in-tree one) add a node; `join` once
            placed and started. Until then it counts as pending; decision-to-serving is timed
            (`llm_cluster_autoscaler_scale_out_seconds`).
  WITHDRAW  a pending scale-up is cancelled: its actor and group go (the timed-out ones first, then
            the newest), so nothing keeps asking Ray for a node the load no longer needs.
  DOWN      a drain: the instance takes no new request (`view.draining`); its requests finish, those
            left at `drain_timeout_s` move to other instances (restarted from the client's tokens, so
            no client sees an error); then it leaves and its actor and group go, and Ray's autoscaler
            removes the idle node.
  FLIP      a drain, then the same actor rejoins the other pool (`switch_role`): no weights reloaded.
A DOWN drains `count` instances at once (the policy asks for several only when the smaller pool is
predicted to hold the stable window's highest load); every action is a task, so a decision never
waits for Ray.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass

from cluster.autoscale.policy import Decision, Direction, Reason
from cluster.types import Role

log = logging.getLogger(__name__)
DRAIN_POLL_S = 0.2


@dataclass
class _Pending:
    launch: object  # runtime.launcher.Launch
    decided_s: float
    task: asyncio.Task | None = None


@dataclass
class _Drain:
    role: Role
    started_s: float
    flip_to: Role | None
    task: asyncio.Task | None = None


class Actuator:
    def __init__(self, cluster, drain_timeout_s: float, metrics=None, model: str = ""):
        self.cluster = cluster  # runtime.launcher.Cluster
        self.drain_timeout_s = drain_timeout_s
        self.metrics = metrics
        self.model = model
        self.pending: dict[str, _Pending] = {}
        self.draining: dict[str, _Drain] = {}
        self.num_migrated = 0  # requests moved off drained instances at their deadline
        # each scale-up's decision -> serving, and what it was made of: placement (a node, if Ray had to
        # add one), the instance's start (process, weights, KV, warm-up, CUDA graphs, probe), joining
        self.scale_outs: collections.deque = collections.deque(maxlen=16)

    # -- what the controller observes ----------------------------------------------------
    def pending_ages_s(self, role: Role, now_s: float) -> tuple[float, ...]:
        ages = [now_s - p.decided_s for p in self.pending.values() if p.launch.role == role]
        ages += [now_s - d.started_s for d in self.draining.values() if d.flip_to == role]  # on their way here
        return tuple(ages)

    def scale_out_s(self, role: Role) -> float | None:
        """Decision to serving of the pool's recent scale-ups (the median; None: none finished yet)."""
        took = sorted(s["total_s"] for s in self.scale_outs if s["pool"] == role.value)
        return took[len(took) // 2] if took else None

    def num_draining(self, role: Role) -> int:
        return sum(1 for d in self.draining.values() if d.role == role)

    # -- acting ---------------------------------------------------------------------------
    def apply(self, decision: Decision) -> None:
        for role, d in decision.pools.items():
            if d.direction == Direction.UP:
                for _ in range(d.count):
                    self._scale_up(role, decision.now_s)
            elif d.direction == Direction.WITHDRAW:
                self._withdraw(role, d.count, oldest_first=d.reason == Reason.PENDING_TIMEOUT)
            elif d.direction == Direction.DOWN:
                for _ in range(d.count):
                    self._drain_one(role, None, decision.now_s)
            elif d.direction == Direction.FLIP:
                self._drain_one(role, d.flip_to, decision.now_s)

    def _scale_up(self, role: Role, now_s: float) -> None:
        launch = self.cluster.launch(role)
        pending = _Pending(launch, now_s)
        self.pending[launch.instance_id] = pending
        pending.task = asyncio.get_running_loop().create_task(self._join(pending))

    async def _join(self, pending: _Pending) -> None:
        launch = pending.launch
        try:
            took = await self.cluster.join(launch)
        except asyncio.CancelledError:
            raise
        except Exception:  # it never started: its resources go back, the next decision sees it missing
            log.exception("scale-up %s failed", launch.instance_id)
            self.pending.pop(launch.instance_id, None)
            await self.cluster.release(launch.instance_id)
            return
        self.pending.pop(launch.instance_id, None)
        total_s = time.monotonic() - pending.decided_s
        view = self.cluster.client.instances.get(launch.instance_id)
        self.scale_outs.append({"instance_id": launch.instance_id, "pool": launch.role.value, "total_s": round(total_s, 3),
                                **{k: round(v, 3) for k, v in took.items()},
                                "instance_start_s": {k: round(v, 3) for k, v in (view.startup_s if view else {}).items()}})
        if self.metrics is not None:
            self.metrics.scale_out_time.labels(self.model, launch.role.value).observe(total_s)

    def _withdraw(self, role: Role, count: int, oldest_first: bool) -> None:
        """Cancel `count` pending scale-ups: the oldest (timed out) or the newest (no longer needed)."""
        mine = sorted((p for p in self.pending.values() if p.launch.role == role), key=lambda p: p.decided_s,
                      reverse=not oldest_first)
        for p in mine[:count]:
            self.pending.pop(p.launch.instance_id)
            if p.task is not None:
                p.task.cancel()
            asyncio.get_running_loop().create_task(self.cluster.release(p.launch.instance_id))

    def _drain_one(self, role: Role, flip_to: Role | None, now_s: float) -> None:
        candidates = [v for v in self.cluster.client.pool(role)]
        if not candidates:
            return
        view = min(candidates, key=lambda v: (len(self.cluster.client.legs_on(v.instance_id)), v.instance_id))
        view.draining = True
        drain = _Drain(role, now_s, flip_to)
        self.draining[view.instance_id] = drain
        drain.task = asyncio.get_running_loop().create_task(self._drain(view.instance_id, drain))

    async def _drain(self, instance_id: str, drain: _Drain) -> None:
        client = self.cluster.client
        deadline = time.monotonic() + self.drain_timeout_s
        try:
            while client.legs_on(instance_id) and time.monotonic() < deadline:
                await asyncio.sleep(DRAIN_POLL_S)
            self.num_migrated += await client.migrate(instance_id, "its instance was scaled in")
            if drain.flip_to is not None:
                await self.cluster.switch_role(instance_id, drain.flip_to)
            else:
                await self.cluster.release(instance_id)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("drain of %s failed; releasing it", instance_id)
            await self.cluster.release(instance_id)
        finally:
            self.draining.pop(instance_id, None)

    async def close(self) -> None:
        for task in [p.task for p in self.pending.values()] + [d.task for d in self.draining.values()]:
            if task is not None:
                task.cancel()
