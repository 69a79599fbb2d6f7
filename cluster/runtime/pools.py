"""The instances the router knows, by id, and what the dispatcher and heartbeat may ask of them and of
the cluster when something goes wrong: the narrow things they take instead of the whole client.

  Pools           every instance's `InstanceView`; the live ones of a role that take requests (not draining);
                  `mark_dead` (once an instance is found dead) ends every `call` still waiting on it
  ClusterEvents   what a dispatcher or heartbeat reports back (implemented by `ClusterClient`):
    instance_died(view, why)        an instance stopped answering: its legs are retried elsewhere
    leg_lost(leg, view, why)        `view` died while a leg the dispatcher was placing was on it (its
                                    death left that leg to the dispatcher): the leg is handled as
                                    `instance_died` handles the others
    abort_remote(instance_id, leg)  forget a leg on an instance (no-op if it died)
    on_delta(view, delta)           a delta that arrived outside the instance's poll (a prefill's
                                    first token held while the leg was being placed)

An instance is found dead by Ray's own answers: a call that raises (`RayActorError`: killed, its process
or node gone), or a heartbeat's stats call and then a ping, each bounded by `router.instance_ttl_s`,
without an answer. Never by a quiet delta poll: an idle, draining or role-switching instance has no
deltas, and a long poll cut short loses the deltas it had taken.
"""
from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod

from cluster.disagg.router import InstanceView
from cluster.types import Role, TokenDelta


class InstanceGone(RuntimeError):
    """The instance was found dead while a call to it was waiting."""


class Pools:
    def __init__(self):
        self.instances: dict[str, InstanceView] = {}
        self.deaths: dict[str, asyncio.Event] = {}  # set once the instance is found dead (ids are never reused)

    def pool(self, role: Role) -> list[InstanceView]:
        """The instances of `role` that take new requests (alive, not draining)."""
        return [v for v in self.instances.values() if v.role == role and v.alive and not v.draining]

    def live(self) -> list[InstanceView]:
        return [v for v in self.instances.values() if v.alive]

    def get(self, instance_id: str | None) -> InstanceView | None:
        return self.instances.get(instance_id or "")

    def block_size(self, default: int = 16) -> int:
        return next((v.block_size for v in self.instances.values()), default)

    def mark_dead(self, view: InstanceView) -> None:
        view.alive = False
        self.deaths.setdefault(view.instance_id, asyncio.Event()).set()

    async def call(self, view: InstanceView, ref):
        """The answer of `ref`, a Ray call on `view`'s actor; `InstanceGone` as soon as the instance is
        found dead by any path (its poll, the heartbeat, a failed link), whichever comes first: a call to
        an actor on a lost node may otherwise wait until Ray declares the node dead."""
        death = self.deaths.setdefault(view.instance_id, asyncio.Event())
        call, waiter = asyncio.ensure_future(ref), asyncio.ensure_future(death.wait())
        try:
            await asyncio.wait({call, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            if not call.done():
                call.cancel()
        if call.done() and not call.cancelled():
            return call.result()
        raise InstanceGone(f"instance {view.instance_id} was found dead")


async def answers(view: InstanceView, timeout_s: float) -> bool:
    """A bounded ping: True if the instance's actor answers within `timeout_s` (its process and node are up)."""
    try:
        await asyncio.wait_for(view.handle.ping.remote(), timeout_s)
        return True
    except Exception:  # dead, unavailable, or too slow to be of use
        return False


class ClusterEvents(ABC):
    @abstractmethod
    async def instance_died(self, view: InstanceView, why: str) -> None: ...

    @abstractmethod
    async def leg_lost(self, leg, view: InstanceView, why: str) -> None: ...

    @abstractmethod
    async def abort_remote(self, instance_id: str | None, leg_id: str) -> None: ...

    @abstractmethod
    async def on_delta(self, view: InstanceView, delta: TokenDelta) -> None: ...
