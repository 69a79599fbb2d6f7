"""Device buffers a prefill gathers its outgoing KV into, allocated once and reused in turn.

A KV message of 64 MiB allocated per send kept the sender's host waiting in the caching allocator
(2xH200, 2026-11-30: 250-600 us a gather launch, against 20 for the kernel): NCCL holds each sent
tensor until its watchdog sees the send done, so every transfer's messages needed fresh memory. A
ring of slots does not allocate: a message is gathered into the next slot whose last send is done.
Slots whose sends are still on the wire are passed over, never waited for (the prefill's compute
would then wait on the decode side's receiver); with every slot busy, or a message larger than a
slot, the message gets a fresh tensor as before.
"""
from __future__ import annotations

import torch


class StagingRing:
    def __init__(self, device: torch.device, slot_bytes: int, num_slots: int):
        self.slots = [torch.empty(slot_bytes, dtype=torch.uint8, device=device) for _ in range(num_slots)]
        self.sends: list = [None] * num_slots  # the send that last read each slot (its work handle)
        self.next = 0
        self.slot_bytes = slot_bytes
        self.num_fresh = 0  # messages that got a fresh tensor instead (every slot busy, or too large)

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[int | None, torch.Tensor | None]:
        """(slot, a `shape` tensor in it); (None, None): allocate the message as before."""
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        in_turn = [(self.next + i) % len(self.slots) for i in range(len(self.slots))]
        for slot in in_turn if nbytes <= self.slot_bytes else []:
            send = self.sends[slot]
            if send is not None and not send.is_completed():
                continue  # still on the wire: passed over, not waited for
            if send is not None:
                send.wait()  # done: orders this stream after it, at no cost
            self.sends[slot], self.next = None, (slot + 1) % len(self.slots)
            return slot, self.slots[slot][:nbytes].view(dtype).view(shape)
        self.num_fresh += 1
        return None, None

    def sent(self, slot: int | None, send) -> None:
        """`send` (the transport's work handle; None: the transport no longer reads the slot) is reading `slot`."""
        if slot is not None:
            self.sends[slot] = send
