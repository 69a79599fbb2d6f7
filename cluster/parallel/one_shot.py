"""One-shot all-reduce through peer memory: the TP collective for decode-sized messages on CUDA.

  (1) `InstanceGroups.connect` makes one per tp group (every rank at once, `agree_on`): a
      symmetric buffer (torch symm_mem: the same allocation mapped on every rank), rendezvoused
      under a name registered for the group; it is checked against NCCL, and the group turns it
      on only if every rank succeeded;
  (2) `TPGroup.all_reduce` sends a message through it when it fits (`max_bytes`, the model's
      dtype, contiguous), else through NCCL: each rank copies its input into its slot and reads
      every slot, summing ("one shot"); the kernel's own barriers (signal pads) order it
      against the peers, so it runs on the current stream and is captured in CUDA graphs like
      any kernel;
  (3) `on_side_stream` runs it on a stream of its own, for the two-micro-batch overlap (NCCL
      has its own stream; this kernel would otherwise run in line with the compute);
  (4) each stream has a symmetric allocation of its own (its own barrier signals), cut in two
      halves used in turn. The kernel's only barrier comes after each rank copied its input
      in, so a rank that starts the next all-reduce may overwrite its slot while a slower peer
      still reads it; with the halves alternating, reusing a half means every peer has passed
      the barrier of the all-reduce in between, so it is done reading. Sharing one buffer
      between the streams gave wrong tokens with overlap on (2xH200): a micro-batch's
      embedding all-reduce on the main stream wrote into the buffer while the other one's
      attention all-reduce on the side stream was reading it. A captured decode step with an odd
      number of all-reduces puts its last and the next replay's first on the same half; between
      them lie the LM head, the sampling sync and the next step's message, far longer than a read.

For the hundreds of KB of a TP decode step it costs a few tens of microseconds where NCCL's
ring costs more (docs/benchmarks.md has the figures); bigger messages stay on NCCL.

  (5) with `ParallelConfig.fuse_all_reduce_norm`, the all-reduce of a row-parallel layer and the
      residual add and RMSNorm after it run as one kernel (`add_rms_norm`, one_shot_norm.py) through
      the same halves, with a flag array of its own per stream; `agree_on` checks it against the
      unfused pair bit for bit and turns only it off if any rank fails.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import _register_process_group


# Symmetric allocations this process has rendezvoused. torch numbers the store keys of every
# rendezvous with one counter per process, so the ranks of an instance agree on those keys only if
# each has made as many rendezvous before; an in-process driver that already served an instance
# is ahead of its new, fresh worker ranks, and their rendezvous would wait for keys never written.
rendezvous_done = 0


def agree_on(name: str, tp, host, store, device: torch.device, dtype: torch.dtype,
             max_bytes: int, fuse_norm: bool = False) -> tuple["OneShotAllReduce | None", str | None]:
    """(the one-shot all-reduce, None) if every rank of the tp group set it up and its sums match
    NCCL's, else (None, why). Every rank of the instance calls it (the host group agrees). With
    `fuse_norm` it also sets up (5), kept only if it matches the unfused pair on every rank (else the
    all-reduce stays and `norm_error` says why)."""
    if host.min_int(rendezvous_done) != -host.min_int(-rendezvous_done):
        # every rank finds this out together (no rank starts a rendezvous the others skip)
        return None, ("ranks of this instance have made different numbers of symmetric-memory rendezvous "
                      "in their processes (a process that ran another tensor-parallel instance before): "
                      "torch's rendezvous keys would not match, so all-reduce stays on NCCL; start each "
                      "instance in fresh processes for the one-shot all-reduce")
    one_shot, error = None, None
    try:
        one_shot = OneShotAllReduce(name, tp.group, tp.rank, tp.size, store, device, dtype, max_bytes)
        for rows in (1, 7, max(1, one_shot.max_numel // 4096)):
            x = (torch.arange(rows * 8, device=device) % 16 + tp.rank).to(dtype).view(rows, 8)  # exact in any dtype
            expect = x.clone()
            tp.all_reduce(expect)
            got = one_shot(x)
            if not torch.equal(got, expect):
                raise RuntimeError(f"one-shot all-reduce of {rows}x8 differs from NCCL's")
    except Exception as exc:  # unsupported build, no peer access, ...: keep NCCL
        error = f"{type(exc).__name__}: {exc}"
    if not host.min_int(0 if error else 1):
        return None, error or "a peer rank could not set it up"
    if fuse_norm:
        norm_error = _check_norm(one_shot, tp, device, dtype)
        if not host.min_int(0 if norm_error else 1):
            one_shot.norm_flags = None
            one_shot.norm_error = norm_error or "a peer rank could not set it up"
    return one_shot, None


NORM_CHECK_TIMEOUT_S = 60.0  # (a peer may still be compiling the kernel when this rank launches it)


class NormHandshakeStuck(RuntimeError):
    """(5)'s check kernel never finished: its flag handshake with the peers is stuck on the device. The
    kernel cannot be stopped, so the rank fails (its instance with it) rather than serving behind it."""


def _wait_device(device: torch.device, timeout_s: float) -> None:
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(device))
    deadline = time.monotonic() + timeout_s
    while not done.query():
        if time.monotonic() > deadline:
            raise NormHandshakeStuck(
                f"the fused all-reduce + add + RMSNorm kernel did not finish in {timeout_s:.0f} s: its flag "
                "handshake with the peer ranks is stuck on the device; start the instance with "
                "ParallelConfig.fuse_all_reduce_norm off")
        time.sleep(1e-3)


def _check_norm(one_shot: "OneShotAllReduce", tp, device: torch.device, dtype: torch.dtype) -> str | None:
    """None if (5) gives the unfused pair's result bit for bit on this rank, else why not. Raises
    NormHandshakeStuck if its kernel never finishes."""
    from cluster.ops import fused

    try:
        one_shot.attach_norm(device)
        hidden = 512
        for rows in (1, 7, 64):
            gen = torch.Generator(device="cpu").manual_seed(rows)
            partial = (torch.randn(rows, hidden, generator=gen) * (tp.rank + 1)).to(device, dtype)
            residual = torch.randn(rows, hidden, generator=gen).to(device, dtype)
            weight = torch.rand(hidden, generator=gen).to(device, dtype)
            expect = fused.fused_add_rms_norm(one_shot(partial), residual, weight, 1e-6)
            got = one_shot.add_rms_norm(partial, residual, weight, 1e-6)
            _wait_device(device, NORM_CHECK_TIMEOUT_S)
            if not all(torch.equal(a, b) for a, b in zip(got, expect)):
                return f"the fused all-reduce + add + RMSNorm of {rows}x{hidden} differs from the unfused kernels"
    except NormHandshakeStuck:
        raise
    except Exception as exc:  # no triton, a compile error, ...: keep the unfused pair
        return f"{type(exc).__name__}: {exc}"
    return None


class OneShotAllReduce:
    """All-reduce of small messages through peer memory over NVLink: one kernel, no NCCL."""

    def __init__(self, name: str, group, rank: int, size: int, store, device: torch.device, dtype: torch.dtype,
                 max_bytes: int):
        import torch.distributed._symmetric_memory as symm_mem
        from torch._C._distributed_c10d import _SymmetricMemory

        self.name = name
        self.max_numel = max_bytes // torch.empty((), dtype=dtype).element_size()
        self.dtype = dtype
        # symm_mem finds the group (and its store) by name in c10d's registry; ours are built
        # outside torch.distributed's default world, so register it under a unique name
        _register_process_group(name, group)
        _SymmetricMemory.set_group_info(name, rank, size, dist.PrefixStore(f"symm/{name}", store))
        self.main = _Halves(symm_mem, name, self.max_numel, dtype, device)  # the compute stream's
        self.side = _Halves(symm_mem, name, self.max_numel, dtype, device)  # the overlap's
        self.side_stream = torch.cuda.Stream(device)  # where an overlapped all-reduce runs
        self.rank, self.size = rank, size
        self.norm_flags: _Flags | None = None  # (5): set up by `attach_norm`
        self.norm_error: str | None = None

    def attach_norm(self, device: torch.device) -> None:
        """(5): a flag array of its own (row x rank) for the fused all-reduce + add + RMSNorm, on the
        compute stream (the overlap's side stream never runs it)."""
        import torch.distributed._symmetric_memory as symm_mem

        self.norm_flags = _Flags(symm_mem, self.name, self.max_numel, self.size, device)

    def fits_norm(self, partial: torch.Tensor, residual: torch.Tensor) -> bool:
        """(5) can take this pair: set up, the model's dtype, [rows, hidden] contiguous, rows within the flags."""
        return (self.norm_flags is not None and self.fits(partial) and partial.dim() == 2
                and partial.shape[0] <= self.norm_flags.rows and residual.shape == partial.shape
                and residual.dtype == partial.dtype and residual.is_contiguous())

    def add_rms_norm(self, partial: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(rms_norm(all-reduced `partial` + residual), all-reduced `partial` + residual), one kernel (5)."""
        from cluster.parallel.one_shot_norm import all_reduce_add_rms_norm

        _, pointers = self.main.next_with_pointers()
        return all_reduce_add_rms_norm(partial, residual, weight, eps, pointers, self.norm_flags.pointers,
                                       self.rank, self.size)

    def fits(self, x: torch.Tensor) -> bool:
        return x.dtype == self.dtype and x.numel() <= self.max_numel and x.is_contiguous()

    def __call__(self, x: torch.Tensor, halves: "_Halves | None" = None) -> torch.Tensor:
        """The sum over the group of `x` (a new tensor; `x` is untouched)."""
        slot = (halves or self.main).next().narrow(0, 0, x.numel()).view(x.shape)
        return torch.ops.symm_mem.one_shot_all_reduce_copy(slot, x, "sum", self.name)

    def on_side_stream(self, x: torch.Tensor) -> tuple["_StreamJoin", torch.Tensor]:
        """(a handle whose wait() orders the current stream after it, the sum), queued on the side stream."""
        main = torch.cuda.current_stream()
        self.side_stream.wait_stream(main)
        with torch.cuda.stream(self.side_stream):
            out = self(x, self.side)
            done = torch.cuda.Event()
            done.record(self.side_stream)
        x.record_stream(self.side_stream)
        out.record_stream(main)
        return _StreamJoin(done), out


def _symmetric(symm_mem, name: str, numel: int, dtype: torch.dtype, device: torch.device, zeroed: bool = False):
    """(a symmetric allocation every rank of group `name` maps, its rendezvous handle), counted in
    `rendezvous_done`. `zeroed`: cleared, and the clearing finished, before the rendezvous (after it a
    peer may write into it)."""
    global rendezvous_done
    buffer = symm_mem.empty(numel, dtype=dtype, device=device)
    if zeroed:
        buffer.zero_()
        torch.cuda.synchronize(device)
    handle = symm_mem.rendezvous(buffer, name)
    rendezvous_done += 1
    return buffer, handle


class _Halves:
    """One symmetric allocation (rendezvoused: every rank maps every rank's) used as two halves in turn."""

    def __init__(self, symm_mem, name: str, numel: int, dtype: torch.dtype, device: torch.device):
        self.buffer, self.handle = _symmetric(symm_mem, name, 2 * numel, dtype, device)
        self.halves = self.buffer.view(2, numel).unbind(0)
        self.turn = 0

        # each half's address on every rank, as a device array (the fused kernel of (5) reads its peers' halves)
        half_bytes = numel * self.buffer.element_size()
        self.pointers = [torch.tensor([base + turn * half_bytes for base in self.handle.buffer_ptrs], dtype=torch.int64,
                                      device=device) for turn in (0, 1)]

    def next(self) -> torch.Tensor:
        return self.next_with_pointers()[0]

    def next_with_pointers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(the next half, its address on every rank)."""
        turn = self.turn
        self.turn ^= 1
        return self.halves[turn], self.pointers[turn]


class _Flags:
    """(5)'s barrier flags: int32 [rows, ranks] on every rank (symmetric), zero between calls. Zeroed and
    synchronised before the rendezvous, so no peer can signal into it before it is clear."""

    def __init__(self, symm_mem, name: str, max_numel: int, size: int, device: torch.device):
        self.rows = max(1, max_numel // 256)  # rows of at least 256 values (a hidden size is larger)
        self.buffer, self.handle = _symmetric(symm_mem, name, self.rows * size, torch.int32, device, zeroed=True)
        self.pointers = torch.tensor(list(self.handle.buffer_ptrs), dtype=torch.int64, device=device)


class _StreamJoin:
    """A work handle for a kernel queued on a side stream: `wait()` orders the current stream after it."""

    __slots__ = ("event",)

    def __init__(self, event):
        self.event = event

    def wait(self):
        torch.cuda.current_stream().wait_event(self.event)
