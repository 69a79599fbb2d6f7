"""One KV link between two endpoints, as the transport uses it: its groups, its message format,
and the bookkeeping of one transfer.

  Link     the pair's payload group (NCCL on CUDA, gloo on CPU) and its control group (gloo,
           host memory: manifests); `post` puts one payload on the wire, `control_recv` takes
           one control message;
  header   [transfer, index, count, dtype code, ndim, dims...] int64, HEADER_LEN wide: what a
           manifest says of each message to come;
  Tracker  one transfer on one side: its state, and on the receiver its expected specs and the
           buffers that landed.
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
# send deadlines (`wait_send`), and by the runtime's heartbeats (which call `disconnect`).
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
    done_s: float | None = None  # time.monotonic() when its last message completed
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


def wait_send(work, kind: str, deadline: float) -> None:
    """Wait for one posted send: gloo blocks in wait() (GIL released; a dead peer raises), NCCL is
    polled with a backoff, so a waiting thread wakes up, and takes the GIL, rarely."""
    if kind == "gloo":
        work.wait()
        return
    pause = 5e-5
    while not work.is_completed():
        if time.monotonic() > deadline:
            raise TimeoutError("NCCL send not completed by its deadline")
        time.sleep(pause)
        pause = min(pause * 2, 2e-3)
