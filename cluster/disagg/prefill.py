"""The prefill side of disaggregation: run the prompt, stream its KV out as it is written.

A `PrefillWorker` has a prefill-role engine and a `KVSender`, the engine's KV sink (the engine's
KV boundary, engine/kv_boundary.py; the engine knows nothing of peers or transports).
  (1) `submit_prefill` queues a request in the engine with a send plan: which decode peer, which
      transfer id (HandoverState.PREFILLING);
  (2) in the step where a request's last prompt chunk runs, the engine asks the sender how its KV
      leaves: in messages of up to `GROUP_BYTES` (several layers each: per-layer posts held a
      transfer to 15% of the link on 2xH200); the sender announces them to each peer, then posts
      each message as the engine hands it over (a message's last layer written, the next layers
      computing). On a GPU a message is gathered into a slot of a staging ring (staging.py);
  (3) after the step the first token is sent as the transfer's last message (SENT); the request's
      delta (that first token) goes back to the router;
  (4) `poll` frees a request's blocks once its sends are done and the decode side confirmed
      (CONFIRMED; a request whose first token was its last needs no confirmation), or the transfer
      failed, or `release_timeout_s` passed.
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass

import torch

from cluster.config import DisaggConfig
from cluster.disagg.roles import RequestSpec, RoleWorker
from cluster.disagg.staging import StagingRing
from cluster.disagg.transfer.base import KVTransport, TransferState
from cluster.engine.engine import Engine
from cluster.engine.kv_boundary import KVExport, KVMessage, KVRequest, KVSink
from cluster.platform import to_device_async
from cluster.types import FinishReason, Role, TokenDelta

GROUP_BYTES = 64 << 20  # KV leaves in messages of up to this many bytes (several layers each)
STAGING_SLOTS = 4  # GPU: messages gathered into a ring of this many GROUP_BYTES buffers (staging.py)


class HandoverState(enum.Enum):
    PREFILLING = "prefilling"  # queued or computing; nothing sent yet
    SENT = "sent"  # every message posted, the first token last
    CONFIRMED = "confirmed"  # the decode side has the KV: the copy here goes once the sends are done


@dataclass
class SendPlan:
    request_id: str
    peer_id: str
    transfer_id: int
    state: HandoverState = HandoverState.PREFILLING
    started_s: float = 0.0
    num_messages: int = 0  # KV messages of this transfer (the first token comes after them)


class KVSender(KVSink):
    """The engine's sink: each message of KV it hands over goes on the link to the request's peer."""

    def __init__(self, transport: KVTransport, plans: dict[str, SendPlan], layer_bytes, staging: StagingRing | None):
        self.transport = transport
        self.plans = plans
        self.layer_bytes = layer_bytes  # num_prompt_tokens -> bytes of one layer of its KV
        self.staging = staging
        self.slots: dict[tuple[str, int], int | None] = {}  # message -> the staging slot it was gathered into
        self.step_plans: list[SendPlan] = []  # this step's transfers, in announced order
        self.bytes_sent = 0

    def plan(self, requests: list[KVRequest]) -> list[KVExport]:
        self.step_plans = [self.plans[r.request_id] for r in requests if r.request_id in self.plans]
        now = time.monotonic()
        for plan in self.step_plans:
            plan.started_s = now
        return [KVExport(r.request_id, r.num_prompt_tokens, max(1, GROUP_BYTES // max(1, self.layer_bytes(r.num_prompt_tokens))))
                for r in requests if r.request_id in self.plans]

    def announce(self, messages: list[KVMessage]) -> None:
        """Each peer learns every message it gets from this step, in order, then each first token."""
        per_peer: dict[str, list] = {}
        for m in messages:
            plan = self.plans[m.request_id]
            plan.num_messages = m.num_messages
            per_peer.setdefault(plan.peer_id, []).append(
                (plan.transfer_id, m.index, m.num_messages + 1, m.shape, m.dtype))
        for plan in self.step_plans:
            count = plan.num_messages + 1
            per_peer.setdefault(plan.peer_id, []).append((plan.transfer_id, count - 1, count, (1,), torch.int64))
        for peer_id, announced in per_peer.items():
            self.transport.announce(peer_id, announced)

    def buffer(self, message: KVMessage) -> torch.Tensor | None:
        if self.staging is None:
            return None
        slot, out = self.staging.take(message.shape, message.dtype)
        self.slots[(message.request_id, message.index)] = slot
        return out

    def take(self, message: KVMessage, kv: torch.Tensor) -> None:
        plan = self.plans[message.request_id]
        self.bytes_sent += kv.numel() * kv.element_size()
        send = self.transport.send_layer(plan.peer_id, plan.transfer_id, message.index, message.num_messages + 1, kv)
        slot = self.slots.pop((message.request_id, message.index), None)
        if self.staging is not None:
            self.staging.sent(slot, send)

    def send_first_tokens(self, deltas: list[TokenDelta], device: torch.device) -> None:
        """(3) each transfer of the step ends with its first token (-1: none came, the decode side recomputes)."""
        by_request = {delta.request_id: delta for delta in deltas}
        for plan in self.step_plans:
            delta = by_request.get(plan.request_id)
            token = delta.token_ids[0] if delta is not None and delta.token_ids else -1
            # pinned and asynchronous: a pageable copy would wait for the next step, already queued on the device
            first = to_device_async(torch.tensor([token], dtype=torch.int64), device)
            count = plan.num_messages + 1
            if plan.state == HandoverState.PREFILLING:  # before the post: the decode side's confirmation may
                plan.state = HandoverState.SENT  # come back (on a Ray thread) before send_layer returns
            self.transport.send_layer(plan.peer_id, plan.transfer_id, count - 1, count, first)
            if delta is not None and delta.finish_reason == FinishReason.PREFILLED:
                delta.finish_reason = None  # the decode side continues the stream
            elif delta is not None and delta.finish_reason is not None:  # the first token was the last: no one
                plan.state = HandoverState.CONFIRMED  # waits for this copy, it goes once the sends are done
        self.step_plans = []


class PrefillWorker(RoleWorker):
    role = Role.PREFILL

    def __init__(self, engine: Engine, transport: KVTransport, config: DisaggConfig):
        super().__init__(engine)
        self.transport = transport
        self.config = config
        self.plans: dict[str, SendPlan] = {}
        layout = engine.kv_layout
        staging = StagingRing(engine.device, GROUP_BYTES, STAGING_SLOTS) if engine.device.type == "cuda" else None
        self.sender = KVSender(transport, self.plans, layout.layer_bytes, staging)
        engine.set_kv_sink(self.sender)

    def submit_prefill(self, spec: RequestSpec, peer_id: str, transfer_id: int) -> None:
        self.engine.add_request(spec.request_id, spec.prompt_token_ids, spec.params, spec.prompt)
        self.plans[spec.request_id] = SendPlan(spec.request_id, peer_id, transfer_id)

    def step(self) -> list[TokenDelta]:
        deltas = self.engine.step()
        self.sender.send_first_tokens(deltas, self.engine.device)
        self.poll()
        return deltas

    # -- (4) ownership of the prefill copy -------------------------------------------------
    def confirm(self, request_id: str) -> None:
        """The decode side has the KV (called on any thread: one assignment the loop reads at its next poll)."""
        plan = self.plans.get(request_id)
        if plan is not None and plan.state == HandoverState.SENT:
            plan.state = HandoverState.CONFIRMED

    def poll(self) -> list[str]:
        """Free KV that is no longer needed; returns request ids whose transfer failed."""
        failed, now = [], time.monotonic()
        for request_id, plan in list(self.plans.items()):
            if plan.state == HandoverState.PREFILLING:
                continue
            state = self.transport.send_state(plan.transfer_id)
            timed_out = now - plan.started_s > self.config.release_timeout_s
            if state == TransferState.FAILED:
                failed.append(request_id)
            if ((state == TransferState.DONE and plan.state == HandoverState.CONFIRMED)
                    or state == TransferState.FAILED or timed_out):
                self._release(request_id)
        return failed

    def waiting_on_network(self) -> bool:
        return bool(self.plans)

    def abort(self, request_id: str) -> None:
        self._release(request_id)

    def _release(self, request_id: str) -> None:
        plan = self.plans.pop(request_id, None)
        if plan is not None:
            self.transport.forget(plan.transfer_id)
        self.engine.release(request_id)

    def stats(self) -> dict:
        # prefilled, KV kept until the decode side confirms
        return {"kv_bytes_sent": self.sender.bytes_sent, "num_held_transfers": len(self.plans)}

    def link_address(self) -> str | None:
        return self.transport.listen()
