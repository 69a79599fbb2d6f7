"""The decode side of disaggregation: reserve blocks, receive KV, join the batch.

  (1) `reserve` has the engine hold blocks for the prompt's KV before anything moves
      (`KVReservation`) and posts the receives (one message a layer, then the first token; the
      sender may stack several layers in one message); a decode instance never accepts KV it
      has no blocks for (False: the router picks another);
  (2) `poll`, between steps, checks every pending transfer without blocking:
        DONE    -> the engine imports the KV into the reserved blocks; the request joins the batch;
        FAILED, older than transfer_timeout_s, or ended without a first token ->
                   on_failure=recompute: the engine computes the prompt here at once and samples
                   the first token itself (an `EventKind.RECOMPUTING` event tells the router, which
                   checks it against a first token the client may already have); on_failure=error:
                   the request ends with an error delta;
  (3) `step` runs the engine and returns its deltas (plus error deltas of (2)).
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass

import torch

from cluster.config import DisaggConfig
from cluster.disagg.roles import EventKind, InstanceEvent, RequestSpec, RoleWorker
from cluster.disagg.transfer.base import KVTransport, TransferState
from cluster.engine.engine import Engine
from cluster.types import FinishReason, Role, TokenDelta


class FailurePolicy(str, enum.Enum):
    RECOMPUTE = "recompute"
    FAIL = "fail"


@dataclass
class PendingTransfer:
    request_id: str
    peer_id: str
    transfer_id: int
    started_s: float


class DecodeWorker(RoleWorker):
    role = Role.DECODE

    def __init__(self, engine: Engine, transport: KVTransport, config: DisaggConfig):
        super().__init__(engine)
        self.transport = transport
        self.config = config
        self.on_failure = FailurePolicy(config.on_failure)
        self.pending: dict[str, PendingTransfer] = {}
        self.errors: list[TokenDelta] = []
        self.events: list[InstanceEvent] = []
        self.num_recomputed = 0
        self.transfer_latencies_s: list[float] = []
        self.max_land_s = 0.0  # the longest landing (KV into the reserved blocks) since the last stats()

    def reserve(self, spec: RequestSpec, peer_id: str, transfer_id: int) -> bool:
        try:
            reservation = self.engine.reserve(spec.request_id, spec.prompt_token_ids, spec.params, spec.prompt)
        except ValueError:  # an invalid request: the client gets a 400
            self.transport.forget(transfer_id)
            raise
        if reservation is None:  # what the prefill already sent for it (it started at once) is dropped, not kept
            self.transport.forget(transfer_id)
            return False
        # every KV head, whatever this instance's tp: the prefill side sends all of them and the
        # engine hands each rank its own (KV heads resharded between pools of any tp)
        specs = reservation.message_specs() + [((1,), torch.int64)]
        self.transport.expect(peer_id, transfer_id, specs, self.engine.device)
        self.pending[spec.request_id] = PendingTransfer(spec.request_id, peer_id, transfer_id, time.monotonic())
        return True

    def poll(self) -> list[str]:
        """Land finished transfers; returns the ids that joined the batch."""
        landed, now = [], time.monotonic()
        for request_id, p in list(self.pending.items()):
            state = self.transport.recv_state(p.transfer_id)
            if state == TransferState.DONE:
                if self._land(p):
                    landed.append(request_id)
            elif state == TransferState.FAILED or now - p.started_s > self.config.transfer_timeout_s:
                self._fall_back(p, "failed" if state == TransferState.FAILED else "timed out")
        return landed

    def _land(self, p: PendingTransfer) -> bool:
        t0 = time.monotonic()
        messages = self.transport.take(p.transfer_id)
        first_token = int(messages[-1].item())
        if first_token < 0:  # the prefill side had no first token to send
            self._fall_back(p, "ended without a first token")
            return False
        del self.pending[p.request_id]
        self.transfer_latencies_s.append(time.monotonic() - p.started_s)
        self.engine.import_kv(p.request_id, messages[:-1], first_token)
        self.max_land_s = max(self.max_land_s, time.monotonic() - t0)
        return True

    def _fall_back(self, p: PendingTransfer, why: str) -> None:
        """No KV: compute the prompt here, now (or fail the request, if so configured)."""
        del self.pending[p.request_id]
        self.transport.forget(p.transfer_id)
        if self.on_failure == FailurePolicy.RECOMPUTE:
            self.num_recomputed += 1
            self.engine.recompute(p.request_id)
            self.events.append(InstanceEvent(EventKind.RECOMPUTING, p.request_id))
            return
        self.engine.abort(p.request_id)
        self.errors.append(TokenDelta(p.request_id, 0, [], "", finish_reason=FinishReason.ERROR,
                                      error=f"KV transfer from {p.peer_id} {why}"))

    def take_events(self) -> list[InstanceEvent]:
        events, self.events = self.events, []
        return events

    def step(self) -> list[TokenDelta]:
        self.poll()
        deltas, self.errors = self.errors, []
        return deltas + self.engine.step()

    def waiting_on_network(self) -> bool:
        return bool(self.pending)

    def abort(self, request_id: str) -> None:
        p = self.pending.pop(request_id, None)
        if p is not None:
            self.transport.forget(p.transfer_id)
        self.engine.abort(request_id)

    def stats(self) -> dict:
        """Drained: each heartbeat reports the hand-overs that landed since the last one."""
        stats = {"num_recomputed": self.num_recomputed, "transfer_latencies_s": self.transfer_latencies_s,
                 "max_land_ms": self.max_land_s * 1e3}
        self.transfer_latencies_s, self.max_land_s = [], 0.0
        return stats

    def link_address(self) -> str | None:
        return self.transport.listen()
