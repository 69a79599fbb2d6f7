"""Device buffers a prefill gathers its outgoing KV into, allocated once and reused in turn.

A KV message of 64 MiB allocated per send kept the sender's host waiting in the caching
allocator (2xH200, 2026-12-01: 250-600 us a gather launch, against 20 for the kernel), because
NCCL holds each sent tensor until its watchdog sees the send done, so every transfer's messages
needed fresh memory. A ring of slots never allocates: a message is gathered into the next slot,
and reusing a slot first makes the gathering stream wait, on the device, for the send that last
read it (the host goes on). A message larger than a slot is allocated as before.
"""
from __future__ import annotations

import torch


class StagingRing:
    def __init__(self, device: torch.device, slot_bytes: int, num_slots: int):
        self.slots = [torch.empty(slot_bytes, dtype=torch.uint8, device=device) for _ in range(num_slots)]
        self.sends: list = [None] * num_slots  # the send that last read each slot (its handle's wait())
        self.next = 0
        self.slot_bytes = slot_bytes

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[int | None, torch.Tensor | None]:
        """(slot, a `shape` tensor in it), once the slot's last send is done on the device; (None, None)
        if the message is larger than a slot."""
        nbytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        if nbytes > self.slot_bytes:
            return None, None
        slot, self.next = self.next, (self.next + 1) % len(self.slots)
        send, self.sends[slot] = self.sends[slot], None
        if send is not None:
            send.wait()  # the current stream waits for it; the host does not
        return slot, self.slots[slot][:nbytes].view(dtype).view(shape)

    def sent(self, slot: int | None, send) -> None:
        """`send` (a handle whose wait() orders the current stream after it, or None: the transport no
        longer reads the slot) is reading `slot`."""
        if slot is not None:
            self.sends[slot] = send
