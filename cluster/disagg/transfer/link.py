"""One KV link between two endpoints, as the transport uses it: its groups, its message format,
and the bookkeeping of one transfer.

  Link     the pair's payload group (NCCL on CUDA, gloo on CPU) and its control group (gloo,
           host memory: manifests); `post` puts one payload on the wire, `control_recv` takes
           one control message;
  header   [transfer, index, count, dtype code, ndim, dims...] int64, HEADER_LEN wide: what a
           manifest says of each message to come;
  Tracker  one transfer on one side: its state, and on the receiver its expected specs and the
           buffers that landed; `check_layout` matches what the sender announced against those
           specs (a message may stack several consecutive expected ones).
"""
from __future__ import annotations

import collections
import queue
import threading
import time
from dataclasses import dataclass, field

import torch
from torch._C._distributed_c10d import BroadcastOptions

from cluster.disagg.transfer.base import TransferState

HEADER_LEN = 12  # transfer id, index, count, dtype code, ndim, up to 7 dims
MAX_DIMS = HEADER_LEN - 5
_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.uint8, torch.float64]
_DTYPE_CODE = {dtype: code for code, dtype in enumerate(_DTYPES)}
# An idle link keeps a header receive posted for as long as it lives; the group's own
# timeout must not fire on it. Dead peers are found by the link's socket (gloo), by the
# NCCL send deadlines (torchdist.py (4)), and by the runtime's heartbeats (which call `disconnect`).
LINK_GROUP_TIMEOUT_S = 365 * 24 * 3600.0


@dataclass
class Link:
    peer_id: str
    group: object  # payloads: NCCL on CUDA, gloo on CPU
    control: object  # manifests (headers): a gloo group of its own, host memory
    my_rank: int
    backend: str
    device: torch.device
    closed: bool = False
    error: str | None = None
    current: object = None  # the receive the link's thread is waiting on (aborted on disconnect)
    direction: str | None = None  # "send" or "recv": fixed by the first use (KV flows one way per link)
    announced: collections.deque = field(default_factory=collections.deque)  # sender: headers not yet sent
    sent: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)  # sender: posted sends, in order, to wait on
    posted: collections.deque = field(default_factory=collections.deque)  # sender: NCCL sends the caller polls

    @property
    def peer_rank(self) -> int:
        return 1 - self.my_rank

    def post(self, tensor: torch.Tensor, sending: bool):
        """One payload: on NCCL a broadcast rooted at the sending side, on gloo a send or a receive."""
        if self.backend == "nccl":
            opts = BroadcastOptions()
            opts.rootRank = self.my_rank if sending else self.peer_rank
            return self.group.broadcast([tensor], opts)
        if sending:
            return self.group.send([tensor], self.peer_rank, 0)
        return self.group.recv([tensor], self.peer_rank, 0)

    def control_recv(self, tensor: torch.Tensor) -> None:
        """Block (GIL released) until the next control message lands in `tensor`."""
        self.current = self.control.recv([tensor], self.peer_rank, 0)
        self.current.wait()
        self.current = None


@dataclass
class Tracker:
    """One transfer on one side. Sender: messages done, counted by the link's send waiter.
    Receiver: the messages it expects, filled in by the link's receiver thread."""

    peer_id: str
    num_expected: int | None  # messages; None: not known yet (the receiver learns it from the first header)
    specs: list | None = None  # receiver: (shape, dtype) per expected message (the sender may stack several)
    state: TransferState = TransferState.WAITING
    buffers: list = field(default_factory=list)
    num_done: int = 0
    error: str | None = None
    created_s: float = field(default_factory=time.monotonic)
    announced: list = field(default_factory=list)  # receiver: (shape, dtype) of each header seen, in order
    num_checked: int = 0  # receiver: announced headers matched against specs so far
    spec_pos: int = 0  # receiver: expected messages those headers cover
    cond: threading.Condition = field(default_factory=threading.Condition)


def encode_header(transfer_id: int, index: int, count: int, shape: tuple[int, ...], dtype: torch.dtype) -> list[int]:
    if len(shape) > MAX_DIMS or dtype not in _DTYPE_CODE:
        raise ValueError(f"cannot send a {dtype} tensor of {len(shape)} dims")
    fields = [transfer_id, index, count, _DTYPE_CODE[dtype], len(shape), *shape]
    return fields + [0] * (HEADER_LEN - len(fields))


def decode_header(header) -> tuple[int, int, int, tuple[int, ...], torch.dtype]:
    """(transfer id, index, count, shape, dtype)."""
    transfer_id, index, count, code, ndim, *dims = header
    return transfer_id, index, count, tuple(dims[:ndim]), _DTYPES[code]


SMALL_MESSAGE_NUMEL = 16


def small_on_host(payload: torch.Tensor) -> torch.Tensor:
    """A landed message of a few values (the first token) is handed over in host memory: reading a
    device copy on the engine's thread would queue behind the step in flight there. Called once this
    thread's stream is synchronised, so the copy waits for nothing."""
    if payload.is_cuda and payload.numel() <= SMALL_MESSAGE_NUMEL:
        return payload.cpu()
    return payload


def normal_specs(specs) -> list[tuple[tuple[int, ...], torch.dtype]]:
    return [(tuple(shape), dtype) for shape, dtype in specs]


def check_layout(tracker: Tracker, transfer_id: int) -> str | None:
    """Match the headers announced so far against the expected messages, in order. A message is one
    expected message, or k consecutive equal ones stacked ([k, *shape]: a sender that has several
    layers ready sends them as one, which costs one post instead of k). None if they fit."""
    with tracker.cond:
        specs = tracker.specs
        while tracker.num_checked < len(tracker.announced):
            shape, dtype = tracker.announced[tracker.num_checked]
            pos = tracker.spec_pos
            if pos < len(specs) and (shape, dtype) == specs[pos]:
                taken = 1
            elif shape and shape[0] > 0 and pos + shape[0] <= len(specs) and all(
                    specs[pos + j] == (shape[1:], dtype) for j in range(shape[0])):
                taken = shape[0]
            else:
                want = f"{specs[pos][1]}{list(specs[pos][0])}" if pos < len(specs) else f"no more than {len(specs)} messages"
                return (f"message {tracker.num_checked} of transfer {transfer_id} is {dtype}{list(shape)}, "
                        f"expected {want} (or several of them stacked)")
            tracker.spec_pos += taken
            tracker.num_checked += 1
    return None


def short_of(tracker: Tracker, transfer_id: int) -> str | None:
    """Every message landed: why they are not all the expected ones; None if they are (or not known yet)."""
    if tracker.specs is None or tracker.spec_pos == len(tracker.specs):
        return None
    return f"transfer {transfer_id} ended after {tracker.spec_pos} of the {len(tracker.specs)} expected messages"
