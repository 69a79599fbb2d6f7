"""In-process transport for unit tests and warm-up: endpoints in one process share a hub."""
from __future__ import annotations

import itertools
from collections import defaultdict

import torch

from cluster.disagg.transfer.base import KVTransport, TransferState

_names = itertools.count()


class LoopbackHub:
    """Mailboxes of every endpoint made with this hub, by address."""

    def __init__(self):
        self.endpoints: dict[str, "LoopbackTransport"] = {}


class LoopbackTransport(KVTransport):
    def __init__(self, hub: LoopbackHub, name: str | None = None):
        self.hub = hub
        self.address = name or f"loopback-{next(_names)}"
        hub.endpoints[self.address] = self
        self.links: dict[str, str] = {}
        self.inbox: dict[int, dict[int, torch.Tensor]] = defaultdict(dict)
        self.expected: dict[int, str] = {}  # transfer -> peer
        self.counts: dict[int, int] = {}  # transfer -> messages its sender said it sends
        self.sent: dict[int, TransferState] = {}

    def listen(self) -> str:
        return self.address

    def connect(self, peer_id: str, address: str, is_master: bool, link_key: str | None = None) -> None:
        self.links[peer_id] = address

    def has_link(self, peer_id: str) -> bool:
        return peer_id in self.links

    def disconnect(self, peer_id: str) -> None:
        self.links.pop(peer_id, None)
        for transfer_id, peer in self.expected.items():
            if peer == peer_id:
                self.inbox[transfer_id][-1] = None  # marks FAILED

    def send_layer(self, peer_id, transfer_id, layer_id, num_layers, kv) -> None:  # a copy: kv is free at once
        peer = self.hub.endpoints.get(self.links.get(peer_id, ""))
        if peer is None:
            self.sent[transfer_id] = TransferState.FAILED
            return
        peer.inbox[transfer_id][layer_id] = kv.clone()
        peer.counts[transfer_id] = num_layers
        self.sent[transfer_id] = TransferState.DONE if layer_id == num_layers - 1 else TransferState.TRANSFERRING

    def send_state(self, transfer_id) -> TransferState:
        return self.sent.get(transfer_id, TransferState.WAITING)

    def expect(self, peer_id, transfer_id, specs, device) -> None:
        self.expected[transfer_id] = peer_id

    def recv_state(self, transfer_id) -> TransferState:
        got = self.inbox.get(transfer_id, {})
        if -1 in got:
            return TransferState.FAILED
        if got and len(got) == self.counts.get(transfer_id):
            return TransferState.DONE
        return TransferState.TRANSFERRING if got else TransferState.WAITING

    def take(self, transfer_id) -> list[torch.Tensor]:
        got = self.inbox.pop(transfer_id)
        self.expected.pop(transfer_id)
        return [got[i] for i in range(self.counts.pop(transfer_id))]

    def forget(self, transfer_id) -> None:
        self.inbox.pop(transfer_id, None)
        self.expected.pop(transfer_id, None)
        self.counts.pop(transfer_id, None)
        self.sent.pop(transfer_id, None)
