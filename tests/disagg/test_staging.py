"""The prefill's staging ring (disagg/staging.py): messages are gathered into slots taken in turn, a
slot is reused only after the device was told to wait for the send that last read it, and a message
larger than a slot is left to a fresh allocation."""
from __future__ import annotations

import torch

from cluster.disagg.staging import StagingRing


class Send:
    """A send's handle as the transport returns it; records when the ring orders a stream after it."""

    def __init__(self, log: list, name: str):
        self.log, self.name = log, name

    def wait(self) -> None:
        self.log.append(self.name)


def test_slots_are_reused_in_turn_after_their_last_send():
    ring = StagingRing(torch.device("cpu"), slot_bytes=1024, num_slots=2)
    log: list[str] = []
    a_slot, a = ring.take((4, 8), torch.float32)  # 128 bytes
    b_slot, b = ring.take((2, 2), torch.bfloat16)
    assert (a_slot, b_slot) == (0, 1) and log == []  # fresh slots: nothing to wait for
    a.fill_(1.0)
    assert a.data_ptr() == ring.slots[0].data_ptr() and ring.slots[0][:128].view(torch.float32).eq(1).all()
    ring.sent(a_slot, Send(log, "a"))
    ring.sent(b_slot, None)  # a transport that copied (or failed): nothing to wait for
    c_slot, c = ring.take((16,), torch.int64)
    assert c_slot == 0 and log == ["a"] and c.data_ptr() == a.data_ptr()
    d_slot, _ = ring.take((1,), torch.int64)
    assert d_slot == 1 and log == ["a"]
    ring.sent(c_slot, Send(log, "c"))
    ring.take((1,), torch.int64)
    assert log == ["a", "c"]  # each send waited for once, when its slot comes round again


def test_a_message_larger_than_a_slot_is_not_staged():
    ring = StagingRing(torch.device("cpu"), slot_bytes=64, num_slots=1)
    assert ring.take((17,), torch.float32) == (None, None)
    ring.sent(None, Send([], "ignored"))  # no slot: nothing kept
    assert ring.sends == [None] and ring.next == 0
