"""What an instance's step loop drives: one role worker, whatever the role (runtime/step_loop.py).

A `RoleWorker` has an engine (and, for prefill and decode, a KV transport). Its methods, and who
calls them (all on the instance's loop thread; Ray calls reach it through the loop's inbox):
  submit(spec)                        mixed: queue a request (ValueError: invalid, the client's 400)
  submit_prefill(spec, peer, xfer)    prefill: queue a request whose KV leaves for `peer`
  reserve(spec, peer, xfer) -> bool   decode: hold blocks for a request's KV (False: none free)
  confirm(request_id)                 prefill: the decode side has the KV (any thread: a flag)
  abort(request_id)                   any role: forget a request, free its KV
  step() -> deltas                    the loop, once per iteration: run the engine, poll transfers
  take_events() -> events             the loop, after each step: what the router should know
  waiting_on_network() -> bool        the loop: poll soon even with no request to step
  stats() -> dict                     a Ray thread, each heartbeat: the role's figures (drained)
A role that does not do something says so with a `RoleError` (the caller's bug, not the instance's).
"""
from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass

from cluster.engine.engine import Engine
from cluster.types import Role, SamplingParams, TokenDelta


@dataclass
class RequestSpec:
    """A request as the router hands it to an instance (plain data: crosses Ray)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None = None


class EventKind(enum.Enum):
    # decode: a request's KV transfer failed and its prompt is being recomputed on this instance,
    # which samples the first token itself (the router checks it against any the client has seen)
    RECOMPUTING = "recomputing"


@dataclass(frozen=True)
class InstanceEvent:
    kind: EventKind
    request_id: str


class RoleError(RuntimeError):
    """A command the instance's role does not take."""


class RoleWorker(ABC):
    role: Role

    def __init__(self, engine: Engine):
        self.engine = engine

    def submit(self, spec: RequestSpec) -> None:
        raise RoleError(f"a {self.role.value} instance takes no plain request")

    def submit_prefill(self, spec: RequestSpec, peer_id: str, transfer_id: int) -> None:
        raise RoleError(f"a {self.role.value} instance does not prefill for a peer")

    def reserve(self, spec: RequestSpec, peer_id: str, transfer_id: int) -> bool:
        raise RoleError(f"a {self.role.value} instance does not take KV from a peer")

    def confirm(self, request_id: str) -> None:
        raise RoleError(f"a {self.role.value} instance sends no KV to confirm")

    @abstractmethod
    def abort(self, request_id: str) -> None: ...

    @abstractmethod
    def step(self) -> list[TokenDelta]: ...

    def take_events(self) -> list[InstanceEvent]:
        return []

    def waiting_on_network(self) -> bool:
        return False

    def stats(self) -> dict:
        return {}

    def link_address(self) -> str | None:
        return None


class MixedWorker(RoleWorker):
    """Colocated: the engine prefills and decodes; nothing moves between instances."""

    role = Role.MIXED

    def submit(self, spec: RequestSpec) -> None:
        self.engine.add_request(spec.request_id, spec.prompt_token_ids, spec.params, spec.prompt)

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    def step(self) -> list[TokenDelta]:
        return self.engine.step()
