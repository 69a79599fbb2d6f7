"""The prefill side of disaggregation: run the prompt, stream its KV out layer by layer.

  (1) `submit` queues a request in the prefill-role engine with a send plan:
      which decode peer, which transfer id;
  (2) in the step where a request's last prompt chunk runs, `begin_step` returns a
      hook the model calls after every layer. A request's layers leave in groups of up to
      `GROUP_BYTES` (one gather and one post per group, not per layer: per-layer posts held
      a transfer to 15% of the link's bandwidth on 2xH200): once a group's last layer is
      written, the group leaves (an async send) while the next layers compute. On a GPU a
      group is gathered into a slot of a staging ring (staging.py), not a fresh tensor. An
      instance of several tp ranks streams the same groups: its ranks gather their head shards
      to rank 0 as each group is written (engine/kv_handover.py, `LayerStreams`). A pipelined
      instance gathers all layers from its stages after the step and sends the groups then;
  (3) after the step the first token is sampled and sent as the transfer's last
      message; the request's deltas (that first token) go back to the router;
  (4) `poll` frees a request's blocks once its sends are done and the decode side
      confirmed, or the transfer failed, or `release_timeout_s` passed.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from cluster.config import DisaggConfig
from cluster.disagg.staging import StagingRing
from cluster.disagg.transfer.base import KVTransport, TransferState
from cluster.engine.engine import Engine
from cluster.engine.kv_handover import LayerStreams, cache_dtype, full_kv_shape, layer_groups
from cluster.platform import to_device_async
from cluster.types import FinishReason, SamplingParams, TokenDelta

GROUP_BYTES = 64 << 20  # KV leaves in messages of up to this many bytes (several layers each)
STAGING_SLOTS = 4  # GPU: messages gathered into a ring of this many GROUP_BYTES buffers (staging.py)


@dataclass
class SendPlan:
    request_id: str
    peer_id: str
    transfer_id: int
    started_s: float = 0.0
    confirmed: bool = False
    first_sent: bool = False


class PrefillWorker:
    def __init__(self, engine: Engine, transport: KVTransport, config: DisaggConfig):
        self.engine = engine
        self.transport = transport
        self.config = config
        self.plans: dict[str, SendPlan] = {}
        self.sending: list[tuple] = []  # (seq, plan) whose prompt completes in this step
        self.block_index: dict[int, torch.Tensor] = {}  # seq id -> its prompt blocks as a device index
        engine.kv_stream = self
        self.num_layers = engine.arch.num_layers
        self.multi_rank = engine.config.parallel.world_size > 1
        # several ranks of one stage stream as they compute; a pipeline's stages gather after the step
        self.gathers_after = self.multi_rank and engine.config.parallel.pipeline_parallel_size > 1
        self.kv_dtype = cache_dtype(engine.runner)
        self.groups: dict[int, list[tuple[int, int]]] = {}  # this step: seq id -> its messages' layer ranges
        self.leaving: dict[int, list[tuple]] = {}  # one rank, this step: layer id -> (seq, plan, index, start, end) it ends
        self.bytes_sent = 0
        self.staging = StagingRing(engine.device, GROUP_BYTES, STAGING_SLOTS) if engine.device.type == "cuda" else None

    def submit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, peer_id: str,
               transfer_id: int, prompt: str | None = None) -> None:
        self.engine.add_request(request_id, prompt_token_ids, params, prompt)
        self.plans[request_id] = SendPlan(request_id, peer_id, transfer_id)

    # -- (2) called by the engine's step ------------------------------------------------
    def begin_step(self, sched):
        sending: dict[str, tuple] = {}  # one transfer per request (its first sequence carries the prompt's KV)
        for item in sched.scheduled:
            if item.samples and item.seq.request_id in self.plans:
                sending.setdefault(item.seq.request_id, (item.seq, self.plans[item.seq.request_id]))
        self.sending = list(sending.values())
        runner = self.engine.runner
        self.block_index = {seq.seq_id: runner.block_index(seq.block_ids[: self._num_blocks(seq)])
                            for seq, _ in self.sending} if not self.multi_rank else {}
        for _, plan in self.sending:
            plan.started_s = time.monotonic()
        self.groups = {seq.seq_id: self._groups(seq) for seq, _ in self.sending}
        self.leaving = {}
        if not self.gathers_after:  # each group leaves when its last layer is written, in request order
            for seq, plan in self.sending:
                for index, (start, end) in enumerate(self.groups[seq.seq_id]):
                    self.leaving.setdefault(end - 1, []).append((seq, plan, index, start, end))
        self._announce()
        if not self.sending or self.gathers_after:
            return None  # (a pipeline: all groups after the step, `_send_gathered`)
        if self.multi_rank:  # the ranks gather each group's head shards to rank 0 as it is written
            return LayerStreams([(seq, self._num_blocks(seq), self._layers_per_message(seq)) for seq, _ in self.sending],
                                self._send_streamed)
        return self._send_layer

    def _announce(self) -> None:
        """Tell each decode peer, before the step runs, every message it will get from this step and
        in which order: by the layer that ends each group, across requests (a group leaves as its last
        layer is written), request-major (a pipeline: gathered after the step), then each request's
        first token."""
        if not self.sending:
            return
        if self.gathers_after:  # request-major: gathered after the step
            order = [(seq, plan, index, start, end) for seq, plan in self.sending
                     for index, (start, end) in enumerate(self.groups[seq.seq_id])]
        else:  # as `_send_layer` sends them: by the layer that ends each group
            order = [group for layer in sorted(self.leaving) for group in self.leaving[layer]]
        per_peer: dict[str, list] = {}
        for seq, plan, index, start, end in order:
            shape = (end - start, *self._kv_shape(seq))
            per_peer.setdefault(plan.peer_id, []).append(
                (plan.transfer_id, index, self._num_messages(seq), shape, self.kv_dtype))
        for seq, plan in self.sending:
            count = self._num_messages(seq)
            per_peer.setdefault(plan.peer_id, []).append((plan.transfer_id, count - 1, count, (1,), torch.int64))
        for peer_id, messages in per_peer.items():
            self.transport.announce(peer_id, messages)

    def _num_messages(self, seq) -> int:
        """How many messages `seq`'s transfer (of this step) is sent as: its KV (a layer or a stacked
        group each), then the first token."""
        return len(self.groups[seq.seq_id]) + 1

    def _groups(self, seq) -> list[tuple[int, int]]:
        """[start, end) layer ranges of the stacked messages of `seq`'s KV."""
        layer_bytes = max(1, torch.Size(self._kv_shape(seq)).numel() * self.kv_dtype.itemsize)
        return layer_groups(self.num_layers, max(1, GROUP_BYTES // layer_bytes))

    def _layers_per_message(self, seq) -> int:
        start, end = self.groups[seq.seq_id][0]
        return end - start

    def _kv_shape(self, seq) -> tuple[int, ...]:
        """One layer of `seq`'s prompt KV, all heads."""
        return full_kv_shape(self.engine.arch, self._num_blocks(seq), self.engine.kv.block_size)

    def _num_blocks(self, seq) -> int:
        return -(-seq.num_prompt_tokens // self.engine.kv.block_size)

    def _send_layer(self, layer_id: int) -> None:
        """Layer `layer_id` is written: each request's group that it ends leaves, in announced order."""
        for seq, plan, index, start, end in self.leaving.get(layer_id, ()):
            slot, out = self._slot(end - start, seq)
            kv = self.engine.runner.read_kv_layers(start, end, self.block_index[seq.seq_id], out)  # one gather
            self.bytes_sent += kv.numel() * kv.element_size()
            self._sent(slot, self.transport.send_layer(plan.peer_id, plan.transfer_id, index, self._num_messages(seq), kv))

    def _send_streamed(self, stream: int, index: int, kv: torch.Tensor) -> None:
        """Rank 0 of several: message `index` of the step's `stream`-th transfer, gathered from the ranks."""
        seq, plan = self.sending[stream]
        self.bytes_sent += kv.numel() * kv.element_size()
        self.transport.send_layer(plan.peer_id, plan.transfer_id, index, self._num_messages(seq), kv)

    def _slot(self, num_layers: int, seq) -> tuple[int | None, torch.Tensor | None]:
        """Where a message of `num_layers` layers of `seq`'s KV is gathered: a staging slot on a GPU
        (None, None: a fresh tensor)."""
        if self.staging is None:
            return None, None
        return self.staging.take((num_layers, *self._kv_shape(seq)), self.kv_dtype)

    def _sent(self, slot: int | None, send) -> None:
        if self.staging is not None:
            self.staging.sent(slot, send)

    # -- (3) after the step ----------------------------------------------------------------
    def _send_gathered(self) -> None:
        for seq, plan in self.sending:
            layers = self.engine.executor.gather_kv(seq.block_ids[: self._num_blocks(seq)])
            count = self._num_messages(seq)
            for index, (start, end) in enumerate(self.groups[seq.seq_id]):
                slot, out = self._slot(end - start, seq)
                kv = torch.stack(layers[start:end], out=out)
                self.bytes_sent += kv.numel() * kv.element_size()
                self._sent(slot, self.transport.send_layer(plan.peer_id, plan.transfer_id, index, count, kv))
                layers[start:end] = [None] * (end - start)  # a group's copies go once it is stacked

    def step(self) -> list[TokenDelta]:
        deltas = self.engine.step()
        if self.gathers_after:
            self._send_gathered()
        by_request = {delta.request_id: delta for delta in deltas}
        for seq, plan in self.sending:  # the announced order
            delta = by_request.get(plan.request_id)
            # -1: no first token came out of this step (the request went away); the decode side recomputes
            token = delta.token_ids[0] if delta is not None and delta.token_ids else -1
            # pinned and asynchronous: a pageable copy would wait for the next step, already queued on the device
            first = to_device_async(torch.tensor([token], dtype=torch.int64), self.engine.device)
            count = self._num_messages(seq)
            self.transport.send_layer(plan.peer_id, plan.transfer_id, count - 1, count, first)
            plan.first_sent = True
            if delta is not None and delta.finish_reason == FinishReason.PREFILLED:
                delta.finish_reason = None  # the decode side continues the stream
        self.sending = []
        return deltas

    # -- (4) ownership of the prefill copy -------------------------------------------------
    def confirm(self, request_id: str) -> None:
        """The decode side has the KV."""
        plan = self.plans.get(request_id)
        if plan is not None:
            plan.confirmed = True

    def poll(self) -> list[str]:
        """Free KV that is no longer needed; returns request ids whose transfer failed."""
        failed, now = [], time.monotonic()
        for request_id, plan in list(self.plans.items()):
            if not plan.first_sent:
                continue
            state = self.transport.send_state(plan.transfer_id)
            timed_out = now - plan.started_s > self.config.release_timeout_s
            if state == TransferState.FAILED:
                failed.append(request_id)
            if (state == TransferState.DONE and plan.confirmed) or state == TransferState.FAILED or timed_out:
                self._release(request_id)
        return failed

    def abort(self, request_id: str) -> None:
        self._release(request_id)

    def _release(self, request_id: str) -> None:
        plan = self.plans.pop(request_id, None)
        if plan is not None:
            self.transport.forget(plan.transfer_id)
        self.engine.release(request_id)
