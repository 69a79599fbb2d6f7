"""The shared-memory step channel between a driver and its ranks (parallel/step_channel.py), with
real processes: every message arrives whole and in order, an oversized one is flagged for the
host group, and a driver whose reader stops taking messages fails instead of hanging."""
from __future__ import annotations

import multiprocessing as mp
import os

import numpy as np
import pytest

from cluster.parallel.step_channel import StepChannel, supported

pytestmark = pytest.mark.skipif(not supported(), reason="the step channel needs x86-64 store ordering")

SLOT_BYTES = 4096


def _message(i: int) -> np.ndarray:
    size = (i * 37) % (SLOT_BYTES // 8) + 1  # 1 .. a full slot
    return np.arange(i, i + size, dtype=np.int64)


def _reader(spec, index: int, count: int, out) -> None:
    channel = StepChannel.attach(spec, index)
    total = 0
    for i in range(count):
        got = channel.recv()
        if i % 50 == 49:
            expected = None  # the driver sent an oversized one
            assert got is None, f"message {i}: expected the oversize flag"
            continue
        expected = _message(i)
        assert got is not None and np.array_equal(got, expected), f"message {i} differs"
        total += int(got.sum())
    out.put(total)


def test_every_message_arrives_in_order_at_every_reader():
    channel = StepChannel.create(num_readers=2, slot_bytes=SLOT_BYTES, num_slots=2)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    count = 400
    readers = [ctx.Process(target=_reader, args=(channel.spec(), r, count, out)) for r in range(2)]
    for p in readers:
        p.start()
    try:
        expected_total = 0
        for i in range(count):
            if i % 50 == 49:
                assert not channel.send(np.zeros(SLOT_BYTES // 8 + 1, dtype=np.int64), lambda: None, 30)
                continue
            message = _message(i)
            assert channel.send(message, lambda: None, 30)
            expected_total += int(message.sum())
        assert [out.get(timeout=60) for _ in readers] == [expected_total] * 2
    finally:
        for p in readers:
            p.join(10)
            if p.exitcode is None:
                p.kill()
        channel.unlink()
    assert all(p.exitcode == 0 for p in readers)
    assert not os.path.exists(channel.path)


def test_a_reader_that_stops_fails_the_driver_not_hangs_it():
    channel = StepChannel.create(num_readers=1, slot_bytes=SLOT_BYTES, num_slots=2)
    channel.unlink()
    # nobody reads: the first two messages fill the slots, the third must wait for an ack
    assert channel.send(_message(0), lambda: None, 1)
    assert channel.send(_message(1), lambda: None, 1)
    with pytest.raises(RuntimeError, match="did not take the step message"):
        channel.send(_message(2), lambda: None, 0.2)

    class RankDied(RuntimeError):
        pass

    def alive():
        raise RankDied("rank 1 died")

    with pytest.raises(RankDied):
        channel.send(_message(2), alive, 30)
