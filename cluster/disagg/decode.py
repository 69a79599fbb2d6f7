"""The decode side of disaggregation: reserve blocks, receive KV, join the batch.

  (1) `reserve` allocates blocks for the prompt's KV before anything moves and
      posts the receives (one message per layer, then the first token; the sender may
      stack several layers in one message); a decode instance never accepts KV it has
      no blocks for (None: pick another);
  (2) `poll`, between steps, checks every pending transfer without blocking:
        DONE    -> KV copied into the reserved blocks, request joins the batch;
        FAILED or older than transfer_timeout_s -> recompute the prompt here
                   (on_failure=recompute) or end the request with an error;
  (3) `step` runs the engine and returns its deltas (plus error deltas of (2)).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from cluster.config import DisaggConfig
from cluster.disagg.transfer.base import KVTransport, TransferState
from cluster.engine.engine import Engine
from cluster.engine.kv_handover import cache_dtype, full_kv_shape
from cluster.types import FinishReason, SamplingParams, TokenDelta


@dataclass
class PendingTransfer:
    request_id: str
    peer_id: str
    transfer_id: int
    block_ids: list[int]
    started_s: float


class DecodeWorker:
    def __init__(self, engine: Engine, transport: KVTransport, config: DisaggConfig):
        self.engine = engine
        self.transport = transport
        self.config = config
        self.pending: dict[str, PendingTransfer] = {}
        self.errors: list[TokenDelta] = []
        self.failed: dict[str, float] = {}  # request id -> when its transfer failed (awaiting recompute)
        self.reported: set[str] = set()
        self.num_recomputed = 0
        self.transfer_latencies_s: list[float] = []
        self.max_land_s = 0.0  # the longest landing (KV into the reserved blocks) since the instance's last stats()

    def reserve(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, peer_id: str,
                transfer_id: int, prompt: str | None = None) -> bool:
        try:
            block_ids = self.engine.reserve(request_id, prompt_token_ids, params, prompt)
        except ValueError:  # an invalid request: the client gets a 400
            self.transport.forget(transfer_id)
            raise
        if block_ids is None:  # what the prefill already sent for it (it started at once) is dropped, not kept
            self.transport.forget(transfer_id)
            return False
        # every KV head, whatever this instance's tp: the prefill side sends all of them and
        # `scatter_kv` hands each rank its own (KV heads resharded between pools of any tp)
        layer = (full_kv_shape(self.engine.arch, len(block_ids), self.engine.kv.block_size), cache_dtype(self.engine.runner))
        specs = [layer] * self.engine.arch.num_layers + [((1,), torch.int64)]
        self.transport.expect(peer_id, transfer_id, specs, self.engine.device)
        self.pending[request_id] = PendingTransfer(request_id, peer_id, transfer_id, block_ids, time.monotonic())
        return True

    def poll(self) -> list[str]:
        """Land finished transfers; returns the ids that joined the batch."""
        landed, now = [], time.monotonic()
        for request_id, p in list(self.pending.items()):
            state = self.transport.recv_state(p.transfer_id)
            if state == TransferState.DONE:
                self._land(p)
                landed.append(request_id)
            elif state == TransferState.FAILED or now - p.started_s > self.config.transfer_timeout_s:
                self._fall_back(p, "failed" if state == TransferState.FAILED else "timed out")
        return landed

    def _land(self, p: PendingTransfer) -> None:
        t0 = time.monotonic()
        messages = self.transport.take(p.transfer_id)
        first_token = int(messages[-1].item())
        if first_token < 0:  # the prefill side had no first token to send
            self._fall_back(p, "ended without a first token")
            return
        self.engine.executor.scatter_kv(p.block_ids, messages[:-1])
        del self.pending[p.request_id]
        self.transfer_latencies_s.append(time.monotonic() - p.started_s)
        self.engine.commit(p.request_id, first_token)
        self.max_land_s = max(self.max_land_s, time.monotonic() - t0)

    def _fall_back(self, p: PendingTransfer, why: str) -> None:
        """No KV: recompute here once the router tells us the first token the client saw (if any)."""
        del self.pending[p.request_id]
        self.transport.forget(p.transfer_id)
        if self.config.on_failure == "recompute":
            self.failed[p.request_id] = time.monotonic()
            return
        self.engine.abort(p.request_id)
        self.errors.append(TokenDelta(p.request_id, 0, [], "", finish_reason=FinishReason.ERROR,
                                      error=f"KV transfer from {p.peer_id} {why}"))

    def take_failed(self) -> list[str]:
        """Transfers that failed since the last call: the router answers each with `recompute`."""
        new = [r for r in self.failed if r not in self.reported]
        self.reported.update(new)
        return new

    def recompute(self, request_id: str, first_token_id: int | None) -> None:
        if self.failed.pop(request_id, None) is None:
            return
        self.reported.discard(request_id)
        self.num_recomputed += 1
        self.engine.recompute(request_id, first_token_id)

    def _recompute_unanswered(self) -> None:
        now = time.monotonic()
        for request_id, since in list(self.failed.items()):
            if now - since > self.config.transfer_timeout_s:
                self.recompute(request_id, None)

    def step(self) -> list[TokenDelta]:
        self.poll()
        self._recompute_unanswered()
        deltas, self.errors = self.errors, []
        return deltas + self.engine.step()

    def abort(self, request_id: str) -> None:
        self.failed.pop(request_id, None)
        p = self.pending.pop(request_id, None)
        if p is not None:
            self.transport.forget(p.transfer_id)
        self.engine.abort(request_id)
