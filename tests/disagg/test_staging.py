"""The prefill's staging ring (disagg/staging.py): messages are gathered into slots taken in turn; a
slot whose last send is still on the wire is passed over (the compute never waits on the network),
one whose send is done is reused after ordering the stream behind it; with every slot busy, or a
message larger than a slot, the message is left to a fresh allocation."""
from __future__ import annotations

import torch

from cluster.disagg.staging import StagingRing


class Send:
    """A send's work handle as the transport returns it (is_completed, wait)."""

    def __init__(self, log: list, name: str, done: bool = True):
        self.log, self.name, self.done = log, name, done

    def is_completed(self) -> bool:
        return self.done

    def wait(self) -> None:
        self.log.append(self.name)


def test_slots_are_reused_in_turn_once_their_send_is_done():
    ring = StagingRing(torch.device("cpu"), slot_bytes=1024, num_slots=2)
    log: list[str] = []
    a_slot, a = ring.take((4, 8), torch.float32)  # 128 bytes
    b_slot, _ = ring.take((2, 2), torch.bfloat16)
    assert (a_slot, b_slot) == (0, 1) and log == []
    a.fill_(1.0)
    assert a.data_ptr() == ring.slots[0].data_ptr() and ring.slots[0][:128].view(torch.float32).eq(1).all()
    ring.sent(a_slot, Send(log, "a"))
    ring.sent(b_slot, None)  # a transport that copied (or failed): nothing reads it
    c_slot, c = ring.take((16,), torch.int64)
    assert c_slot == 0 and log == ["a"] and c.data_ptr() == a.data_ptr()
    assert ring.take((1,), torch.int64)[0] == 1 and ring.num_fresh == 0


def test_a_slot_still_on_the_wire_is_passed_over_never_waited_for():
    ring = StagingRing(torch.device("cpu"), slot_bytes=64, num_slots=2)
    log: list[str] = []
    first, _ = ring.take((4,), torch.float32)
    ring.sent(first, Send(log, "slow", done=False))
    second, _ = ring.take((4,), torch.float32)
    ring.sent(second, Send(log, "done"))
    assert ring.take((4,), torch.float32)[0] == second and log == ["done"]  # slot 0 skipped
    ring.sent(second, Send(log, "slow too", done=False))
    assert ring.take((4,), torch.float32) == (None, None) and ring.num_fresh == 1  # all busy: allocate
    assert log == ["done"]  # nothing waited on a send in flight


def test_a_message_larger_than_a_slot_is_not_staged():
    ring = StagingRing(torch.device("cpu"), slot_bytes=64, num_slots=1)
    assert ring.take((17,), torch.float32) == (None, None)
    ring.sent(None, Send([], "ignored"))  # no slot: nothing kept
    assert ring.sends == [None] and ring.next == 0 and ring.num_fresh == 1
