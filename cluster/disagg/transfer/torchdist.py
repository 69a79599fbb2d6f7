"""KV transport over torch.distributed: NCCL on CUDA, gloo on CPU, one group per pair.

Links are made on demand, not in one static world, so an instance that joins later
gets links without restarting anyone:

  (1) every endpoint runs a small TCPStore server (`listen` -> "host:port");
  (2) to link A and B, the runtime calls connect on both at once: the master side uses
      its own store, the other side dials it; both build a 2-rank process group
      (ProcessGroupNCCL / ProcessGroupGloo) under a prefix unique to the pair;
  (3) one message per layer: the layer's K and V for the request's blocks, packed
      [2, num_blocks, block_size, kv_heads, head_dim], tagged by (transfer, layer);
  (4) a waiter thread per transfer turns the collective's work handles into a polled
      state (gloo's handles only complete inside wait(); NCCL's are polled);
  (5) a dead peer shows up as an error or the group's timeout: the transfer FAILS
      and the caller recomputes; `disconnect` drops the group.
"""
from __future__ import annotations

import datetime
import threading
import time
from dataclasses import dataclass, field

import torch

from cluster.disagg.transfer.base import KVTransport, TransferState, tag_of
from cluster.parallel.groups import dial_store, pair_group, serve_store


@dataclass
class _Link:
    group: object
    my_rank: int

    @property
    def peer_rank(self) -> int:
        return 1 - self.my_rank


@dataclass
class _Tracker:
    """Work handles of one transfer, waited on by one thread."""

    peer_id: str
    num_expected: int
    state: TransferState = TransferState.WAITING
    buffers: list = field(default_factory=list)
    works: list = field(default_factory=list)
    num_done: int = 0
    error: str | None = None
    cond: threading.Condition = field(default_factory=threading.Condition)


class TorchDistTransport(KVTransport):
    def __init__(self, endpoint_id: str, host: str = "127.0.0.1", backend: str = "gloo", timeout_s: float = 10.0):
        self.endpoint_id = endpoint_id
        self.host = host
        self.backend = backend
        self.timeout = datetime.timedelta(seconds=timeout_s)
        self.store = None
        self.links: dict[str, _Link] = {}
        self.epochs: dict[str, int] = {}
        self.trackers: dict[int, _Tracker] = {}
        self.lock = threading.Lock()

    # -- links -----------------------------------------------------------------
    def listen(self) -> str:
        if self.store is None:
            self.store = serve_store(self.host, 0, None, self.timeout.total_seconds())
            self.address = f"{self.host}:{self.store.port}"
        return self.address

    def connect(self, peer_id: str, address: str, is_master: bool) -> None:
        """Both sides call this (concurrently); `address` is the master side's listen()."""
        host, port = address.rsplit(":", 1)
        store = self.store if is_master else dial_store(host, int(port), None, self.timeout.total_seconds())
        pair = "/".join(sorted([self.endpoint_id, peer_id]))
        epoch = self.epochs[peer_id] = self.epochs.get(peer_id, 0) + 1  # both sides count reconnects alike
        group = pair_group(store, f"link/{pair}/{epoch}", 0 if is_master else 1, self.backend,
                           self.timeout.total_seconds(), self.host)
        with self.lock:
            self.links[peer_id] = _Link(group, 0 if is_master else 1)

    def has_link(self, peer_id: str) -> bool:
        return peer_id in self.links

    def disconnect(self, peer_id: str) -> None:
        with self.lock:
            link = self.links.pop(peer_id, None)
            trackers = [t for t in self.trackers.values() if t.peer_id == peer_id]
        for t in trackers:
            self._fail(t, f"link to {peer_id} was torn down")
        if link is not None and self.backend == "nccl" and hasattr(link.group, "abort"):
            link.group.abort()

    # -- sender ------------------------------------------------------------------
    def send_layer(self, peer_id, transfer_id, layer_id, num_layers, kv) -> None:
        tracker = self._tracker(transfer_id, peer_id, num_layers)
        link = self.links.get(peer_id)
        if link is None:
            self._fail(tracker, f"no link to {peer_id}")
            return
        kv = kv.contiguous()
        try:
            work = link.group.send([kv], link.peer_rank, tag_of(transfer_id, layer_id, num_layers))
        except RuntimeError as exc:
            self._fail(tracker, str(exc))
            return
        self._add_work(tracker, work, kv)

    def send_state(self, transfer_id) -> TransferState:
        t = self.trackers.get(transfer_id)
        return t.state if t else TransferState.WAITING

    # -- receiver ------------------------------------------------------------------
    def expect(self, peer_id, transfer_id, specs, device) -> None:
        tracker = self._tracker(transfer_id, peer_id, len(specs))
        link = self.links.get(peer_id)
        if link is None:
            self._fail(tracker, f"no link to {peer_id}")
            return
        for index, (shape, dtype) in enumerate(specs):
            buf = torch.empty(shape, dtype=dtype, device=device)
            try:
                work = link.group.recv([buf], link.peer_rank, tag_of(transfer_id, index, len(specs)))
            except RuntimeError as exc:
                self._fail(tracker, str(exc))
                return
            self._add_work(tracker, work, buf)

    def recv_state(self, transfer_id) -> TransferState:
        return self.send_state(transfer_id)

    def take(self, transfer_id) -> list[torch.Tensor]:
        tracker = self.trackers.pop(transfer_id)
        if tracker.state != TransferState.DONE:
            raise RuntimeError(f"transfer {transfer_id} is {tracker.state.value}, not done")
        return tracker.buffers

    def forget(self, transfer_id) -> None:
        self.trackers.pop(transfer_id, None)

    def error(self, transfer_id) -> str | None:
        t = self.trackers.get(transfer_id)
        return t.error if t else None

    # -- waiting ---------------------------------------------------------------------
    def _tracker(self, transfer_id: int, peer_id: str, num_layers: int) -> _Tracker:
        with self.lock:
            tracker = self.trackers.get(transfer_id)
            if tracker is None:
                tracker = self.trackers[transfer_id] = _Tracker(peer_id, num_layers)
                threading.Thread(target=self._wait_all, args=(tracker,), daemon=True, name=f"kv-wait-{transfer_id}").start()
        return tracker

    def _add_work(self, tracker: _Tracker, work, buf: torch.Tensor) -> None:
        with tracker.cond:
            tracker.works.append(work)
            tracker.buffers.append(buf)
            if tracker.state == TransferState.WAITING:
                tracker.state = TransferState.TRANSFERRING
            tracker.cond.notify()

    def _wait_all(self, tracker: _Tracker) -> None:
        deadline = time.monotonic() + self.timeout.total_seconds() * 3
        while tracker.num_done < tracker.num_expected and tracker.state != TransferState.FAILED:
            with tracker.cond:
                while len(tracker.works) <= tracker.num_done and tracker.state != TransferState.FAILED:
                    if not tracker.cond.wait(timeout=max(0.0, deadline - time.monotonic())):
                        self._fail(tracker, "timed out waiting for the next layer to be posted")
                        return
                if tracker.state == TransferState.FAILED:
                    return
                work = tracker.works[tracker.num_done]
            try:
                self._wait_one(work, deadline)
            except Exception as exc:  # gloo/NCCL report a dead peer or a timeout as RuntimeError/DistError
                self._fail(tracker, f"{type(exc).__name__}: {exc}")
                return
            tracker.num_done += 1
        if tracker.state != TransferState.FAILED:
            tracker.state = TransferState.DONE

    def _wait_one(self, work, deadline: float) -> None:
        if self.backend == "gloo":
            work.wait()
            return
        while not work.is_completed():
            if time.monotonic() > deadline:
                raise TimeoutError("NCCL transfer timed out")
            time.sleep(0.0002)

    def _fail(self, tracker: _Tracker, message: str) -> None:
        with tracker.cond:
            if tracker.state != TransferState.DONE:
                tracker.state = TransferState.FAILED
                tracker.error = message
            tracker.cond.notify_all()
