"""The transfers one `TorchDistTransport` endpoint knows, and every change of their state.

  sender    `sender` makes a transfer's tracker at its first message; `sent_one` counts each
            message the link's waiter (or the caller's poll) saw done;
  receiver  `expect` makes or adopts the tracker of a reserved transfer; a manifest's header that
            comes first makes one in `early` (`receiving`), `announced` checks each header against
            the expected specs, `landed` fills in each payload;
  both      `fail` / `fail_peer` end transfers with an error; `state`, `take`, `forget`, `error`
            are what the transport's callers ask.

Every method may run on the engine's thread or on a link's thread: the table is guarded by `lock`,
each tracker by its own condition. `notify` (the transport's `on_ready`, if set) is called when a
transfer this side expects ends, so an idle step loop wakes at once.
"""
from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable

import torch

from cluster.disagg.transfer.base import TransferState
from cluster.disagg.transfer.link import Tracker, check_layout, normal_specs, short_of

FORGOTTEN_KEPT = 4096  # transfer ids given up on whose late messages are dropped, not kept waiting


class TransferBook:
    def __init__(self, timeout_s: float, notify: Callable[[], None]):
        self.timeout_s = timeout_s
        self.notify = notify
        self.trackers: dict[int, Tracker] = {}
        # receiver: transfers whose messages came before their `expect` (the router starts a prefill
        # while the decode side reserves): they wait here, in the link's buffers, until `expect`
        # takes them, or are dropped after the timeout
        self.early: dict[int, Tracker] = {}
        self.forgotten: collections.deque = collections.deque(maxlen=FORGOTTEN_KEPT)  # ids given up on
        self.lock = threading.Lock()

    # -- what callers ask ----------------------------------------------------------------
    def state(self, transfer_id: int) -> TransferState:
        t = self.trackers.get(transfer_id)
        return t.state if t else TransferState.WAITING

    def take(self, transfer_id: int) -> list[torch.Tensor]:
        tracker = self.trackers.pop(transfer_id)
        if tracker.state != TransferState.DONE:
            raise RuntimeError(f"transfer {transfer_id} is {tracker.state.value}, not done")
        for buf in tracker.buffers:
            if buf.is_cuda:  # allocated on the receiver thread's stream, read on the caller's: the
                buf.record_stream(torch.cuda.current_stream(buf.device))  # memory is not reused under it
        return tracker.buffers

    def forget(self, transfer_id: int) -> None:
        with self.lock:
            self.trackers.pop(transfer_id, None)
            self.early.pop(transfer_id, None)
            self.forgotten.append(transfer_id)  # its messages still coming land in scratch

    def error(self, transfer_id: int) -> str | None:
        t = self.trackers.get(transfer_id)
        return t.error if t else None

    # -- sender ----------------------------------------------------------------------
    def sender(self, transfer_id: int, peer_id: str, num_messages: int) -> Tracker:
        with self.lock:
            tracker = self.trackers.get(transfer_id)
            if tracker is None:
                tracker = self.trackers[transfer_id] = Tracker(peer_id, num_messages)
        return tracker

    @staticmethod
    def sent_one(tracker: Tracker) -> None:
        """One of the transfer's messages is on the other side."""
        with tracker.cond:
            tracker.num_done += 1
            if tracker.num_done >= tracker.num_expected and tracker.state != TransferState.FAILED:
                tracker.state = TransferState.DONE

    # -- receiver ---------------------------------------------------------------------
    def expect(self, peer_id: str, transfer_id: int, specs) -> Tracker:
        """The tracker of a transfer this side reserved for: new, or the one its early messages made."""
        with self.lock:
            tracker = self.early.pop(transfer_id, None)
            if tracker is None:  # how many messages carry them: the sender's first header says
                tracker = Tracker(peer_id, None, specs=normal_specs(specs))
            self.trackers[transfer_id] = tracker
        if tracker.specs is None:
            self._adopt(tracker, transfer_id, normal_specs(specs))
        return tracker

    def receiving(self, peer_id: str, transfer_id: int, count: int) -> Tracker | None:
        """The tracker a message of `transfer_id` lands in: the expected one, else one waiting for its
        `expect` (made now; old ones nobody took are dropped); None for a transfer given up on."""
        with self.lock:
            tracker = self.trackers.get(transfer_id) or self.early.get(transfer_id)
            if tracker is None and transfer_id not in self.forgotten:
                too_old = time.monotonic() - self.timeout_s
                for stale in [tid for tid, t in self.early.items() if t.created_s < too_old]:
                    del self.early[stale]
                tracker = self.early[transfer_id] = Tracker(peer_id, count, buffers=[None] * count)
        return tracker

    @staticmethod
    def announced(tracker: Tracker, transfer_id: int, count: int, shape, dtype) -> str | None:
        """A header of `transfer_id` is in: note it, and check it against the transfer's `expect`
        (if made yet). Why it does not fit; None if it does."""
        with tracker.cond:
            if tracker.num_expected is None:
                tracker.num_expected, tracker.buffers = count, [None] * count
            elif tracker.num_expected != count:
                return f"transfer {transfer_id} is sent as {count} messages, its earlier ones said {tracker.num_expected}"
            tracker.announced.append((tuple(shape), dtype))
        return check_layout(tracker, transfer_id) if tracker.specs is not None else None

    def _adopt(self, tracker: Tracker, transfer_id: int, specs: list) -> None:
        """`expect` for a transfer whose first messages came before it: check what was announced, then keep it."""
        with tracker.cond:
            tracker.specs = specs
        error = check_layout(tracker, transfer_id)
        with tracker.cond:
            if error is None and tracker.state == TransferState.DONE:
                error = short_of(tracker, transfer_id)
            if error:  # even if every message is in: it is not the KV this side reserved for
                tracker.state, tracker.error = TransferState.FAILED, error
            ended = tracker.state in (TransferState.DONE, TransferState.FAILED)
        if ended:
            self.notify()

    def landed(self, tracker: Tracker, transfer_id: int, index: int, payload: torch.Tensor) -> None:
        with tracker.cond:
            if tracker.state == TransferState.FAILED or tracker.buffers[index] is not None:
                return
            tracker.buffers[index] = payload
            tracker.num_done += 1
            short = short_of(tracker, transfer_id) if tracker.num_done >= tracker.num_expected else None
            if short:
                tracker.state, tracker.error = TransferState.FAILED, short
            elif tracker.num_done >= tracker.num_expected:
                tracker.state = TransferState.DONE
            else:
                tracker.state = TransferState.TRANSFERRING
        if tracker.state in (TransferState.DONE, TransferState.FAILED):
            self.notify()

    # -- failures ----------------------------------------------------------------------
    def fail(self, tracker: Tracker, message: str) -> None:
        with tracker.cond:
            failed_now = tracker.state not in (TransferState.DONE, TransferState.FAILED)
            if tracker.state != TransferState.DONE:
                tracker.state = TransferState.FAILED
                tracker.error = message
            tracker.cond.notify_all()
        if failed_now and tracker.specs is not None:
            self.notify()

    def fail_peer(self, peer_id: str, why: str) -> None:
        with self.lock:
            trackers = [t for t in [*self.trackers.values(), *self.early.values()] if t.peer_id == peer_id]
        for t in trackers:
            self.fail(t, why)
