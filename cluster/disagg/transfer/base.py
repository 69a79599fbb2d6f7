"""KV transport: moves a request's KV, layer by layer, from a prefill instance to a decode instance.

A transfer is a polled state machine; neither step loop ever blocks on the network:

    WAITING ──first layer posted──▶ TRANSFERRING ──all layers done──▶ DONE
        └──────────── peer gone / error / timeout ────────────────▶ FAILED

Who owns the blocks at each moment:
  - the decode side reserves its blocks before any KV is written into them (`expect`), and
    owns them throughout; on FAILED it recomputes the prompt there (or fails the request).
    The router starts a prefill while the decode side reserves, so messages may come before
    their `expect`: they wait in the link's receive buffers (never in KV blocks) until `expect`
    takes them, and are dropped if none comes within the transport's timeout;
  - the prefill side keeps its blocks until its sends are DONE and the decode side has
    confirmed (or a timeout frees them).

Methods (sender = prefill instance's step loop, receiver = decode instance's step loop,
links = the runtime when instances join or leave):
  listen() -> address              links: where peers can rendezvous with this endpoint
  connect(peer_id, address, is_master, link_key)  links: make a pairwise link (blocks until both sides
                                   join; both pass the same `link_key`, or none and count their connects)
  disconnect(peer_id)              links: tear a dead peer's link down; its transfers FAIL
  announce(peer_id, messages)      sender: what this step will send, in order (optional)
  send_layer(peer_id, transfer_id, index, num_messages, tensor)  sender: post message `index`
                                   (layer l's KV [2, blocks, ...]; the last one: the first token)
  send_state(transfer_id)          sender: poll
  expect(peer_id, transfer_id, specs, device)  receiver: post receives, one (shape, dtype) per message
                                   (or take what already came for it, checked against `specs`)
  recv_state(transfer_id)          receiver: poll
  take(transfer_id) -> list[kv]    receiver: the landed layers, once DONE (forgets the transfer)
  forget(transfer_id)              either side: drop a transfer's bookkeeping
"""
from __future__ import annotations

import enum
from abc import ABC, abstractmethod

import torch


class TransferState(enum.Enum):
    WAITING = "waiting"
    TRANSFERRING = "transferring"
    DONE = "done"
    FAILED = "failed"


class KVTransport(ABC):
    # Called (from a transport thread, no arguments) when a transfer this side expects ends,
    # DONE or FAILED, so an idle step loop can wake at once instead of at its next poll.
    on_ready = None

    @abstractmethod
    def listen(self) -> str: ...

    @abstractmethod
    def connect(self, peer_id: str, address: str, is_master: bool, link_key: str | None = None) -> None: ...

    @abstractmethod
    def disconnect(self, peer_id: str) -> None: ...

    @abstractmethod
    def send_layer(self, peer_id: str, transfer_id: int, layer_id: int, num_layers: int, kv: torch.Tensor):
        """Post one message. Returns a handle whose wait() orders the caller's current stream after the
        send has read `kv` (then `kv` may be overwritten), or None if the transport reads it no more."""

    def announce(self, peer_id: str, messages: list[tuple[int, int, int, tuple[int, ...], torch.dtype]]) -> None:
        """Optional: the (transfer, index, count, shape, dtype) of the messages about to be sent to
        `peer_id`, in send order (one call per prefill step), so the receiver can post them together."""
        return None

    @abstractmethod
    def send_state(self, transfer_id: int) -> TransferState: ...

    @abstractmethod
    def expect(self, peer_id: str, transfer_id: int, specs: list[tuple[tuple[int, ...], torch.dtype]],
               device: torch.device) -> None: ...

    @abstractmethod
    def recv_state(self, transfer_id: int) -> TransferState: ...

    @abstractmethod
    def take(self, transfer_id: int) -> list[torch.Tensor]: ...

    @abstractmethod
    def forget(self, transfer_id: int) -> None: ...

    def has_link(self, peer_id: str) -> bool:
        return False

    def close(self) -> None:
        return None
