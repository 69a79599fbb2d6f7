"""The driver's per-step message to the other ranks of a one-host instance, through shared memory.

Every step the driver tells each rank what to run (step_plan.py: a fixed header, then the
plan as int64s). Over the gloo host group that was two TCP round trips on loopback per step
(~0.2-0.5 ms on the 2xH200 host) before rank 1 could even start uploading its inputs; here
the driver writes the message into a mapped file and the ranks, which poll it, see it within
microseconds:

    file   [slot 0 | slot 1 | ... ]   each slot: seq (int64) | nbytes (int64) | acks[num_readers] | data
    send   wait until every reader acked the message that used this slot last, write data and
           nbytes, then seq (last: a reader that sees the new seq sees the data before it)
    recv   wait for the next seq in the next slot, copy the data out, ack it

  (1) a message larger than a slot sets nbytes to -1 and follows on the host group (rare:
      a slot holds a full batch of 8192 tokens with 256 sequences of 16k context);
  (2) a reader that waits spins (yielding the CPU) for SPIN_S, then sleeps in growing steps up
      to SLEEP_MAX_S, so a loaded instance reacts in microseconds and an idle one costs nothing;
  (3) the driver's wait for acks checks `alive()` (the executor's liveness) and gives up after
      `timeout_s`: a dead rank fails the instance, it never hangs it;
  (4) the driver unlinks the file once every rank has mapped it, so nothing is left behind if
      any process dies.

The ordering of plain stores that (send) relies on holds on x86-64 (TSO); elsewhere
`supported()` is False and the executor keeps the host group.
"""
from __future__ import annotations

import mmap
import os
import platform
import tempfile
import time
import uuid
from collections.abc import Callable

import numpy as np

SPIN_S = 0.05
SLEEP_MAX_S = 0.002
ALIVE_CHECK_S = 0.01
_META = 2  # seq, nbytes


def supported() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


class StepChannel:
    def __init__(self, path: str, num_readers: int, slot_bytes: int, num_slots: int, reader: int | None):
        """`reader` None: the driver (writer); else this rank's reader index (world rank - 1)."""
        self.path, self.num_readers, self.num_slots, self.reader = path, num_readers, num_slots, reader
        self.head_words = _META + num_readers
        self.slot_words = self.head_words + slot_bytes // 8
        fd = os.open(path, os.O_RDWR)
        try:
            self.map = mmap.mmap(fd, num_slots * self.slot_words * 8)
        finally:
            os.close(fd)
        self.words = np.frombuffer(self.map, dtype=np.int64).reshape(num_slots, self.slot_words)
        self.seq = 0  # messages sent (driver) or received (reader) so far

    @classmethod
    def create(cls, num_readers: int, slot_bytes: int = 1 << 20, num_slots: int = 2) -> "StepChannel":
        directory = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
        path = os.path.join(directory, f"llm-cluster-step-{uuid.uuid4().hex}")
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, num_slots * (_META + num_readers + slot_bytes // 8) * 8)
        finally:
            os.close(fd)
        return cls(path, num_readers, slot_bytes, num_slots, reader=None)

    def spec(self) -> tuple:
        """What a rank passes to `attach` (picklable)."""
        return self.path, self.num_readers, (self.slot_words - self.head_words) * 8, self.num_slots

    @classmethod
    def attach(cls, spec: tuple, reader: int) -> "StepChannel":
        path, num_readers, slot_bytes, num_slots = spec
        return cls(path, num_readers, slot_bytes, num_slots, reader)

    def unlink(self) -> None:
        """Remove the file's name (the mappings stay valid); once every rank has attached."""
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    # -- driver -------------------------------------------------------------------
    def send(self, message: np.ndarray, alive: Callable[[], None], timeout_s: float) -> bool:
        """Write one int64 message for every reader; False if it is too large (send it another way;
        the readers are told so). `alive()` raises if a rank died."""
        slot = self.words[self.seq % self.num_slots]
        previous = self.seq - self.num_slots + 1  # the message this slot held; every reader must be past it
        if previous > 0:
            self._wait(lambda: int(slot[_META:self.head_words].min()) >= previous, alive, timeout_s)
        fits = message.size <= self.slot_words - self.head_words
        if fits:
            slot[self.head_words:self.head_words + message.size] = message
        slot[1] = message.size if fits else -1
        self.seq += 1
        slot[0] = self.seq  # last: publishes the message
        return fits

    # -- a rank ---------------------------------------------------------------------
    def recv(self) -> np.ndarray | None:
        """The next message (a copy); None when it was too large and follows on the host group."""
        slot = self.words[self.seq % self.num_slots]
        expected = self.seq + 1
        self._wait(lambda: int(slot[0]) == expected, None, None)
        nbytes = int(slot[1])
        message = slot[self.head_words:self.head_words + nbytes].copy() if nbytes >= 0 else None
        self.seq = expected
        slot[_META + self.reader] = expected  # ack: the driver may reuse the slot
        return message

    @staticmethod
    def _wait(ready: Callable[[], bool], alive: Callable[[], None] | None, timeout_s: float | None) -> None:
        start = checked = time.monotonic()
        pause = 0.0
        while not ready():
            now = time.monotonic()
            if alive is not None and now - checked > ALIVE_CHECK_S:
                alive()
                checked = now
            if timeout_s is not None and now - start > timeout_s:
                raise RuntimeError(f"a rank did not take the step message for {timeout_s:.0f} s")
            if now - start > SPIN_S:
                pause = min(SLEEP_MAX_S, max(pause * 2, 50e-6))
            time.sleep(pause)  # 0: yield the CPU to whoever is runnable, then look again
