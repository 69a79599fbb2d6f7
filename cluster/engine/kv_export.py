"""How a prefill-role engine hands its prompts' KV to its `KVSink` (kv_boundary.py) during a step.

  (1) `begin_step(sched)`, before the step runs: the requests whose last prompt chunk runs in it go
      to `sink.plan`; for each export the messages are cut (`layer_groups`) and announced in the
      order they will be handed out; the step's layer hook comes back for the executor:
        one process      a per-layer callback: when a message's last layer is written, that
                         message's layers are gathered (one gather, into `sink.buffer`'s tensor if
                         it lends one) and handed to `sink.take`, while the next layers compute;
        several tp ranks a `LayerStreams`: every rank gathers each message's head shards to rank 0 as
                         its last layer is written (kv_handover.py), rank 0 hands it to the sink;
        pipelined        nothing during the step;
  (2) `end_step()`: a pipelined instance gathers every layer from its stages and hands the messages
      out now, request by request.
Hand-out order: by the layer that ends each message, across requests (1); request-major (2).
"""
from __future__ import annotations

import torch

from cluster.engine.kv_boundary import KVExport, KVLayout, KVMessage, KVRequest, KVSink
from cluster.engine.kv_handover import LayerStreams, layer_groups


class KVStreamer:
    def __init__(self, sink: KVSink, executor, layout: KVLayout, multi_rank: bool, pipelined: bool):
        self.sink = sink
        self.executor = executor
        self.layout = layout
        self.multi_rank = multi_rank
        self.gathers_after = multi_rank and pipelined
        self.exports: list[tuple[object, KVExport, list[KVMessage]]] = []  # this step: (seq, export, messages)
        self.leaving: dict[int, list[tuple]] = {}  # one process: layer id -> (seq, message) it ends

    def begin_step(self, sched):
        firsts = {}  # one transfer per request (its first sequence carries the prompt's KV)
        for item in sched.scheduled:
            if item.samples:
                firsts.setdefault(item.seq.request_id, item.seq)
        exports = self.sink.plan([KVRequest(r, seq.num_prompt_tokens) for r, seq in firsts.items()]) if firsts else []
        self.exports = [(firsts[e.request_id], e, self._messages(e)) for e in exports]
        self.leaving = {}
        for seq, _, messages in self.exports:
            for message in messages:
                self.leaving.setdefault(message.end_layer - 1, []).append((seq, message))
        if self.gathers_after:
            order = [m for _, _, messages in self.exports for m in messages]
        else:
            order = [m for layer in sorted(self.leaving) for _, m in self.leaving[layer]]
        if order:
            self.sink.announce(order)
        if not self.exports or self.gathers_after:
            return None
        if self.multi_rank:
            entries = [(seq, self.layout.num_blocks(e.num_prompt_tokens), e.layers_per_message)
                       for seq, e, _ in self.exports]
            return LayerStreams(entries, self._streamed)
        index = {seq.seq_id: self.executor.runner.block_index(self._blocks(seq)) for seq, _, _ in self.exports}
        return lambda layer_id: self._layer_done(layer_id, index)

    def end_step(self) -> None:
        if self.gathers_after:
            for seq, _, messages in self.exports:
                layers = self.executor.gather_kv(self._blocks(seq))
                for message in messages:
                    start, end = message.start_layer, message.end_layer
                    self.sink.take(message, torch.stack(layers[start:end], out=self.sink.buffer(message)))
                    layers[start:end] = [None] * (end - start)  # a message's copies go once it is stacked
        self.exports, self.leaving = [], {}

    def _messages(self, export: KVExport) -> list[KVMessage]:
        groups = layer_groups(self.layout.num_layers, max(1, export.layers_per_message))
        shape = self.layout.layer_shape(export.num_prompt_tokens)
        return [KVMessage(export.request_id, i, len(groups), start, end, (end - start, *shape), self.layout.dtype)
                for i, (start, end) in enumerate(groups)]

    def _blocks(self, seq) -> list[int]:
        return seq.block_ids[: self.layout.num_blocks(seq.num_prompt_tokens)]

    def _layer_done(self, layer_id: int, index: dict) -> None:
        for seq, message in self.leaving.get(layer_id, ()):
            out = self.sink.buffer(message)
            kv = self.executor.runner.read_kv_layers(message.start_layer, message.end_layer, index[seq.seq_id], out)
            self.sink.take(message, kv)

    def _streamed(self, stream: int, index: int, kv: torch.Tensor) -> None:
        """Rank 0 of several: message `index` of the step's `stream`-th export, gathered from the ranks."""
        self.sink.take(self.exports[stream][2][index], kv)
