"""The instances the router knows, by id, and what the dispatcher and heartbeat may ask of them and of
the cluster when something goes wrong: the narrow things they take instead of the whole client.

  Pools           every instance's `InstanceView`; the live ones of a role that take requests (not draining)
  ClusterEvents   what a dispatcher or heartbeat reports back (implemented by `ClusterClient`):
    instance_died(view, why)        an instance stopped answering: its legs are retried elsewhere
    abort_remote(instance_id, leg)  forget a leg on an instance (no-op if it died)
    on_delta(view, delta)           a delta that arrived outside the instance's poll (a prefill's
                                    first token held while the leg was being placed)
"""
from __future__ import annotations

from abc import ABC, abstractmethod

from cluster.disagg.router import InstanceView
from cluster.types import Role, TokenDelta


class Pools:
    def __init__(self):
        self.instances: dict[str, InstanceView] = {}

    def pool(self, role: Role) -> list[InstanceView]:
        """The instances of `role` that take new requests (alive, not draining)."""
        return [v for v in self.instances.values() if v.role == role and v.alive and not v.draining]

    def live(self) -> list[InstanceView]:
        return [v for v in self.instances.values() if v.alive]

    def get(self, instance_id: str | None) -> InstanceView | None:
        return self.instances.get(instance_id or "")

    def block_size(self, default: int = 16) -> int:
        return next((v.block_size for v in self.instances.values()), default)


class ClusterEvents(ABC):
    @abstractmethod
    async def instance_died(self, view: InstanceView, why: str) -> None: ...

    @abstractmethod
    async def abort_remote(self, instance_id: str | None, leg_id: str) -> None: ...

    @abstractmethod
    async def on_delta(self, view: InstanceView, delta: TokenDelta) -> None: ...
