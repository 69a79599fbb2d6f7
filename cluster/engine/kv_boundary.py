"""The engine's KV boundary: what a role (disagg/prefill.py, disagg/decode.py) may know of an
engine's KV, as data, and the one hook the engine calls out through.

Data (the engine makes them; a role reads them and never the engine's runner, executor or caches):
  KVLayout      the unit that moves between instances whatever their tp x pp: one layer of a
                prompt's KV with every KV head, [2, blocks, block_size, kv_heads, head_dim], and its dtype
  KVBlocks      a prefilled request's KV and first token, read out of the engine (`Engine.export_kv`)
  KVExport      how one request's prompt KV leaves in a step: `layers_per_message` layers a message
  KVMessage     one message of a step's KV, in the order the engine hands them out

The hook, a `KVSink` (a prefill-role engine has one; `Engine.set_kv_sink`). Per step, in order:
  (1) `plan(requests)` before the step runs: the requests whose last prompt chunk runs in it
      (`KVRequest`); the sink answers with a `KVExport` for each that should leave;
  (2) `announce(messages)`: every message the step will hand out, in hand-out order (a sink that
      sends can tell its peers what comes, before anything is computed);
  (3) `buffer(message)` then `take(message, kv)` for each message, as soon as its last layer is
      written (one process or several tp ranks: while the next layers compute; a pipelined
      instance: after the step). `buffer` may lend a tensor to gather into (None: a fresh one);
      `kv` is [layers, 2, blocks, block_size, kv_heads, head_dim] on the engine's device.
After the step the sink's owner reads the step's deltas (each exported request's first token).

A decode-role engine takes KV in with `reserve` -> `KVReservation` (blocks held before anything
moves), `import_kv` (the landed messages and the first token) and `recompute` (none came).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVLayout:
    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    def num_blocks(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def layer_shape(self, num_tokens: int) -> tuple[int, ...]:
        """One layer's KV of the blocks holding `num_tokens` tokens, every KV head."""
        return (2, self.num_blocks(num_tokens), self.block_size, self.num_kv_heads, self.head_dim)

    def layer_bytes(self, num_tokens: int) -> int:
        return torch.Size(self.layer_shape(num_tokens)).numel() * self.dtype.itemsize


@dataclass(frozen=True)
class KVRequest:
    """A request whose prompt's last chunk runs in this step (its KV can leave)."""

    request_id: str
    num_prompt_tokens: int


@dataclass(frozen=True)
class KVExport:
    request_id: str
    num_prompt_tokens: int
    layers_per_message: int


@dataclass(frozen=True)
class KVMessage:
    request_id: str
    index: int  # of the request's messages, 0-based
    num_messages: int  # the request's KV messages (its layers in groups)
    start_layer: int
    end_layer: int  # exclusive
    shape: tuple[int, ...]  # [layers, 2, blocks, block_size, kv_heads, head_dim]
    dtype: torch.dtype


@dataclass(frozen=True)
class KVBlocks:
    """A prefilled request's KV (one tensor a layer, every KV head) and its first token."""

    request_id: str
    prompt_token_ids: list[int]
    first_token_id: int
    layers: list[torch.Tensor]


@dataclass(frozen=True)
class KVReservation:
    """Blocks a decode-role engine holds for a request's prompt KV, and what it expects to land."""

    request_id: str
    num_prompt_tokens: int
    layout: KVLayout

    def message_specs(self) -> list[tuple[tuple[int, ...], torch.dtype]]:
        """(shape, dtype) of one message a layer (a sender may stack several in one)."""
        return [(self.layout.layer_shape(self.num_prompt_tokens), self.layout.dtype)] * self.layout.num_layers


class KVSink(ABC):
    @abstractmethod
    def plan(self, requests: list[KVRequest]) -> list[KVExport]: ...

    @abstractmethod
    def announce(self, messages: list[KVMessage]) -> None: ...

    def buffer(self, message: KVMessage) -> torch.Tensor | None:
        return None

    @abstractmethod
    def take(self, message: KVMessage, kv: torch.Tensor) -> None: ...
