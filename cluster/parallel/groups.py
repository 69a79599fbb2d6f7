"""The one place that builds process groups (the handles layers talk through are in handles.py).

An instance is `tp x pp` ranks on one host; world rank w = stage * tp + tp_rank:

    stage 0:   w0 ... w(tp-1)          tp group "tp0"   (w0 is the driver: it schedules and samples)
    stage 1:   w(tp) ... w(2tp-1)      tp group "tp1"
               column r: "pipe{r}"     stage s -> s+1 activations
                         "back{r}"     last stage -> stage 0: normed hidden rows that sample
    all ranks: "host"                  gloo on CPU whatever the platform: the step broadcast

The return path has a communicator of its own so that, on NCCL, it never queues
behind the forward sends on the same stream (with two stages both would share one).

Lifecycle:
  (1) the driver serves a TCPStore at ParallelConfig.master_addr (port from config, or a
      free one) and passes the port to the ranks it spawns;
  (2) every rank calls `build_groups`; groups are made in one global order, each rank
      making those it belongs to. A group is a c10d ProcessGroup built straight from a
      PrefixStore (no torch.distributed default group, so one process can hold the
      groups of several instances and the KV transport's links besides);
  (3) `connect` opens the device communicators in a deadlock-free order and, on CUDA, gives
      the tp group its one-shot all-reduce for small messages (parallel/one_shot.py; NCCL if
      any rank cannot); layers receive their `TPGroup` (experts their EP group), the
      pipeline its `PipeGroup`, the executor the `HostGroup`;
  (4) `InstanceGroups.abort()` makes pending device collectives fail (NCCL would wait on a
      dead peer until the timeout; gloo sees the closed socket by itself), waiting at most
      ABORT_WAIT_S for NCCL's abort, which can itself hang.

The backend comes from the platform: gloo on CPU, NCCL on CUDA; an NPU's collective
library is one more entry in `_BACKENDS`.
"""
from __future__ import annotations

import datetime
import logging
import socket
import threading
import uuid
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from cluster.parallel.handles import HostGroup, PipeGroup, TPGroup

# The host group waits for the next step however long the engine idles; a dead peer is
# seen through its closed socket and the driver's liveness watch, not through a timeout.
HOST_GROUP_TIMEOUT = datetime.timedelta(days=365)
# How long `abort` waits for ncclCommAbort, which can hang when the peers are gone
ABORT_WAIT_S = 10.0

log = logging.getLogger(__name__)


@dataclass
class InstanceGroups:
    """Every group one rank belongs to."""

    world_rank: int
    tp: TPGroup
    ep: TPGroup  # == tp when experts are spread over the tp ranks, else single
    pipe: PipeGroup
    host: HostGroup
    backend: str
    store: object | None = None  # the instance's rendezvous store
    name: str = ""  # the tp group's name (unique per instance)
    aborted: bool = False
    one_shot_error: str | None = None  # why one-shot all-reduce is off although asked for

    def connect(self, device: torch.device, dtype: torch.dtype | None = None, one_shot_max_bytes: int = 0) -> None:
        """Open every device communicator now, in an order that cannot deadlock: NCCL makes them
        lazily and blocks until both ends arrive, so the first step's up-front receives (pipeline.py)
        would otherwise wait on a peer that is itself waiting to send. On CUDA with
        `one_shot_max_bytes`, the tp group also gets its one-shot all-reduce (`_attach_one_shot`)."""
        probe = torch.zeros(1, device=device)
        self.tp.all_reduce(probe)
        if device.type == "cuda" and one_shot_max_bytes > 0 and self.tp.size > 1:
            self._attach_one_shot(device, dtype or torch.bfloat16, one_shot_max_bytes)
        pipe = self.pipe
        if pipe.num_stages > 1:
            if not pipe.is_first:
                pipe.recv_prev(probe, tag=0).wait()
            if not pipe.is_last:
                pipe.send_next(probe, tag=0).wait()
            if pipe.is_last:
                pipe.send_first(probe, tag=0).wait()
            if pipe.is_first:
                pipe.recv_last(probe, tag=0).wait()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def _attach_one_shot(self, device: torch.device, dtype: torch.dtype, max_bytes: int) -> None:
        """The tp group's one-shot all-reduce, if every rank sets it up (else NCCL stays, and
        `one_shot_error` says why): parallel/one_shot.py `agree_on`."""
        from cluster.parallel.one_shot import agree_on

        key = f"{self.name}/one-shot-id"
        if self.tp.rank == 0:
            self.store.set(key, uuid.uuid4().hex[:12])  # a fresh symm-mem group name per instance
        name = f"{self.name}/{self.store.get(key).decode()}"
        one_shot, self.one_shot_error = agree_on(name, self.tp, self.host, self.store, device, dtype, max_bytes,
                                                 fuse_norm=self.tp.fuse_norm)
        if one_shot is not None:
            self.tp = replace(self.tp, one_shot=one_shot)
            if self.ep.size > 1:
                self.ep = replace(self.ep, one_shot=one_shot)

    def abort(self, wait_s: float = ABORT_WAIT_S) -> bool:
        """Fail pending device collectives now (a peer died); gloo needs no help.

        ncclCommAbort can itself hang: recent NCCL syncs the ranks of a node even while aborting,
        and the peers may be gone (2xH200: a driver's second TP instance hung here at shutdown).
        The aborts run on a daemon thread and the caller waits at most `wait_s`; False if they
        had not returned by then (the communicators are left to the process's exit)."""
        if self.backend == "gloo" or self.aborted:
            return True
        self.aborted = True
        groups = [pg for pg in (self.tp.group, self.pipe.forward, self.pipe.back) if pg is not None and hasattr(pg, "abort")]
        done = threading.Event()

        def run() -> None:
            for pg in groups:
                pg.abort()
            done.set()

        threading.Thread(target=run, name="nccl-abort", daemon=True).start()
        if done.wait(wait_s):
            return True
        log.warning("NCCL abort of %d groups still running after %.0f s; left to the process's exit", len(groups), wait_s)
        return False


def serve_store(addr: str, port: int, world_size: int | None, timeout_s: float) -> dist.TCPStore:
    """A rendezvous store listening on `addr` only; port 0 picks a free one (read it back from `.port`).

    TCPStore alone listens on every interface; binding the socket ourselves keeps a store on
    127.0.0.1 local to the host. The store takes the socket's descriptor over (`detach`).
    """
    sock = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET)
    sock.bind((addr, port))
    sock.listen(128)
    bound_port = sock.getsockname()[1]
    return dist.TCPStore(addr, bound_port, world_size, is_master=True, wait_for_workers=False,
                         timeout=datetime.timedelta(seconds=timeout_s), master_listen_fd=sock.detach(), use_libuv=False)


def pair_group(store, name: str, rank: int, kind: str, timeout_s: float, host_addr: str):
    """A 2-rank backend group made at run time between two processes (the disaggregation KV links).

    Both sides call this at once with the same `name`; rank 0 is the side whose store it is.
    Returns the raw backend (gloo or NCCL), whose send/recv take a peer rank and a tag.
    """
    timeout = datetime.timedelta(seconds=timeout_s)
    # high priority: a layer's KV leaves while the prefill's next layer computes
    backend, _, _ = _BACKENDS[kind](dist.PrefixStore(name, store), rank, 2, timeout, host_addr, True)
    return backend


def dial_store(addr: str, port: int, world_size: int, timeout_s: float) -> dist.TCPStore:
    return dist.TCPStore(addr, port, world_size, is_master=False, timeout=datetime.timedelta(seconds=timeout_s))


def build_groups(world_rank: int, parallel, backend: str, store, instance_id: str = "") -> InstanceGroups:
    """Make every group `world_rank` belongs to (all ranks call this with the same arguments but rank)."""
    tp, pp = parallel.tensor_parallel_size, parallel.pipeline_parallel_size
    stage, tp_rank = divmod(world_rank, tp)
    timeout = datetime.timedelta(seconds=parallel.collective_timeout_s)
    host_addr = parallel.master_addr
    prefix = f"{instance_id}/" if instance_id else ""

    def make(name: str, ranks: list[int], kind: str, group_timeout=timeout):
        return _new_group(store, prefix + name, ranks.index(world_rank), len(ranks), kind, group_timeout, host_addr,
                          parallel.comm_high_priority, parallel.nccl_max_ctas)

    # one global order: host, tp0..tp(pp-1), pipe0.., back0..
    host = make("host", list(range(tp * pp)), "gloo", HOST_GROUP_TIMEOUT) if tp * pp > 1 else None
    tp_group = make(f"tp{stage}", [stage * tp + r for r in range(tp)], backend) if tp > 1 else None
    forward = back = None
    if pp > 1:
        column = [s * tp + tp_rank for s in range(pp)]
        forward = make(f"pipe{tp_rank}", column, backend)
        if stage in (0, pp - 1):
            back = make(f"back{tp_rank}", [column[0], column[-1]], backend)
    tp_handle = TPGroup(tp_rank, tp, tp_group, fuse_norm=parallel.fuse_all_reduce_norm and tp > 1)
    ep_handle = tp_handle if parallel.expert_parallel_size > 1 else TPGroup.single()
    return InstanceGroups(world_rank, tp_handle, ep_handle, PipeGroup(stage, pp, forward, back),
                          HostGroup(world_rank, tp * pp, host), backend, store, prefix + f"tp{stage}")


def _gloo(prefix_store, rank: int, size: int, timeout, host_addr: str, high_priority: bool = False, max_ctas: int = 0):
    opts = dist.ProcessGroupGloo._Options()
    opts._timeout = timeout
    opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host_addr)]
    backend = dist.ProcessGroupGloo(prefix_store, rank, size, opts)
    return backend, dist.ProcessGroup.BackendType.GLOO, torch.device("cpu")


def _nccl(prefix_store, rank: int, size: int, timeout, host_addr: str, high_priority: bool = False, max_ctas: int = 0):
    opts = dist.ProcessGroupNCCL.Options()
    opts.is_high_priority_stream = high_priority
    if max_ctas:  # at most this many thread blocks (SMs) per collective: the rest stay with the compute stream
        opts.config.max_ctas = max_ctas
    opts._timeout = timeout
    backend = dist.ProcessGroupNCCL(prefix_store, rank, size, opts)
    return backend, dist.ProcessGroup.BackendType.NCCL, torch.device("cuda")


_BACKENDS = {"gloo": _gloo, "nccl": _nccl}  # an NPU platform adds its collective library here


def _new_group(store, name: str, rank: int, size: int, kind: str, timeout, host_addr: str, high_priority: bool = False,
               max_ctas: int = 0):
    if kind not in _BACKENDS:
        raise ValueError(f"no process-group backend {kind!r}; known: {', '.join(_BACKENDS)}")
    prefix_store = dist.PrefixStore(name, store)
    group = dist.ProcessGroup(prefix_store, rank, size)
    backend, backend_type, device = _BACKENDS[kind](prefix_store, rank, size, timeout, host_addr, high_priority, max_ctas)
    group._set_default_backend(backend_type)
    if hasattr(backend, "_set_sequence_number_for_group"):
        backend._set_sequence_number_for_group()
    group._register_backend(device, backend_type, backend)
    return group
