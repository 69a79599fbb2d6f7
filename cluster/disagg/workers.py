"""The role worker of an instance, by role (roles.py says what a worker does)."""
from __future__ import annotations

from cluster.disagg.decode import DecodeWorker
from cluster.disagg.prefill import PrefillWorker
from cluster.disagg.roles import MixedWorker, RoleWorker
from cluster.engine.engine import Engine
from cluster.types import Role


def make_role_worker(role: Role, engine: Engine, transport=None, disagg=None) -> RoleWorker:
    if role == Role.MIXED:
        return MixedWorker(engine)
    if role == Role.PREFILL:
        return PrefillWorker(engine, transport, disagg)
    return DecodeWorker(engine, transport, disagg)
