"""One instance as a Ray actor: an engine, its role's worker (mixed, prefill or decode) and the
step loop that owns them (step_loop.py, shared with the in-process client).

  (1) the actor builds its engine, its KV link endpoint and its role's worker (disagg/roles.py);
  (2) the loop thread owns the worker: between steps it runs the commands Ray calls queued,
      steps, polls transfers, and publishes deltas and events; nothing else touches the engine;
  (3) Ray calls (submit, reserve, abort, connect...) only queue commands, and those that answer
      wait on a future the loop thread resolves between steps;
  (4) `next_deltas` is a long poll: the router gets every delta and event of every request on this
      instance in one call per step, not one call per token.

No Ray call happens inside the step loop; the loop never blocks on the network. The actor holds
no role branch: what differs between roles is the worker's.
"""
from __future__ import annotations

import time

_IMPORT_BEGAN_S = time.perf_counter()  # before this module's imports (torch's among them)

import logging  # noqa: E402 (the clock above goes first)
import threading  # noqa: E402
import traceback
from dataclasses import replace

from cluster.config import DisaggConfig, EngineConfig
from cluster.engine.stats import StartupClock
from cluster.disagg.roles import InstanceEvent, RequestSpec
from cluster.disagg.workers import make_role_worker
from cluster.runtime.gc_pauses import GcPauses, freeze_startup_objects
from cluster.runtime.step_loop import LoopListener, StepLoop
from cluster.types import FinishReason, Role, TokenDelta


def local_device_ids(assigned: list, visible: list[str] | None) -> tuple[int, ...]:
    """This process's CUDA indices of the GPUs Ray assigned it, given the GPUs it sees (`visible`: its
    CUDA_VISIBLE_DEVICES, None when unset: every GPU of the host). Ray names an assigned GPU by its
    entry in that list, or by its index when the list is unset."""
    if visible is None:
        return tuple(int(i) for i in assigned)
    return tuple(visible.index(str(i)) for i in assigned)


def _visible_gpus() -> list[str] | None:
    """The GPUs this process sees. A node started with RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES (the
    launcher's RAYLET_ENV, the chart's pods) leaves every GPU of the host visible. NCCL between
    processes that see different GPU sets is slow to open P2P links and has hung on large messages
    (NVIDIA/nccl#1749), and CUDA IPC needs the peer's GPU visible. A node without it masks each actor
    to its own GPUs: that works, with a warning. The node's environment does this, not the actor's
    runtime_env: an actor with a runtime_env of its own cannot start on a worker Ray started ahead."""
    import os

    if not os.environ.get("RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"):
        log.warning("this Ray node masks each actor to its own GPUs (no RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES "
                    "in its environment, cluster/runtime/launcher.py RAYLET_ENV): KV links between instances of "
                    "one host may open slowly")
    masked = os.environ.get("CUDA_VISIBLE_DEVICES")
    return None if masked is None else [d.strip() for d in masked.split(",") if d.strip()]


def _threads_for_assigned_cpus() -> None:
    """As many torch threads as CPUs Ray gave this actor, one at least (a worker Ray started ahead may
    have imported torch before its OMP_NUM_THREADS said so); its ranks' processes inherit the same."""
    import os

    import ray
    import torch

    context = ray.get_runtime_context()
    if context.get_actor_id() is None:  # built in-process (tests), not as Ray's actor: nothing assigned
        return
    cpus = max(1, int(context.get_assigned_resources().get("CPU", 1)))
    os.environ["OMP_NUM_THREADS"] = str(cpus)
    torch.set_num_threads(cpus)


def _on_assigned_gpus(engine_config: EngineConfig) -> EngineConfig:
    """On GPUs: the engine's ranks bind the devices Ray assigned this actor, rank 0 this process."""
    _threads_for_assigned_cpus()
    if engine_config.runner.device == "cpu":
        return engine_config
    import ray
    import torch

    assigned = ray.get_gpu_ids()
    if not assigned or not torch.cuda.is_available():
        return engine_config
    device_ids = local_device_ids(assigned, _visible_gpus())
    torch.cuda.set_device(device_ids[0])
    return replace(engine_config, runner=replace(engine_config.runner, device_ids=device_ids))


log = logging.getLogger(__name__)

_PROCESS_START_S = time.perf_counter()  # this module is imported as the actor's process starts


def _process_age_s() -> float | None:
    """How long this process had run when this module began to import (Linux: /proc), None elsewhere: a
    worker Ray started ahead is old, one started for this actor young."""
    try:
        import os

        with open("/proc/self/stat") as f:
            started_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        age_now = uptime - started_ticks / os.sysconf("SC_CLK_TCK")
        return max(0.0, age_now - (time.perf_counter() - _IMPORT_BEGAN_S))
    except (OSError, ValueError, IndexError):
        return None


_PROCESS_AGE_AT_IMPORT_S = _process_age_s()

# what `stats()` says of the steps since the last call, worst case first: where a stream's pauses come
# from; and the decode side's count of recomputed prefills (each a failed transfer, run inside its
# decode steps), which /health reports beside them
STALL_KEYS = ("max_step_ms", "max_step_gap_ms", "commands_ms", "max_gc_ms", "max_land_ms", "num_recomputed")


class InstanceActor(LoopListener):
    def __init__(self, instance_id: str, role: Role, engine_config: EngineConfig, disagg: DisaggConfig):
        from cluster.engine.engine import Engine
        from cluster.engine.prefill_rate import measure_prefill_rate
        from cluster.models.tokenizer import Tokenizer

        self.instance_id = instance_id
        self.role = role
        self.launch_config = engine_config  # as launched: what an API adopting it compares with its own
        clock, t0 = StartupClock(), time.perf_counter()
        engine_config = _on_assigned_gpus(engine_config)
        with clock.phase("tokenizer"):
            tokenizer = Tokenizer.from_dir(engine_config.model.path)
        with clock.phase("engine"):
            self.engine = Engine(engine_config, role=role, tokenizer=tokenizer, progress=False)
        # admission's prefill rate until this instance has had a queue to measure (admission.py)
        with clock.phase("prefill_rate_probe"):
            self.prefill_rate_at_start = None if role == Role.DECODE else measure_prefill_rate(
                self.engine, runs=2 if self.engine.device.type == "cuda" else 1)
        # what this instance's start took: since its process began (imports included), and by phase
        self.startup_s = {**({"process_age_at_import": _PROCESS_AGE_AT_IMPORT_S} if _PROCESS_AGE_AT_IMPORT_S is not None else {}),
                          "imports": _PROCESS_START_S - _IMPORT_BEGAN_S, "since_import": time.perf_counter() - _PROCESS_START_S, "actor_init": time.perf_counter() - t0,
                          **clock.phases, **self.engine.startup_s}
        self.transport = self._make_transport(disagg) if role != Role.MIXED else None
        self.worker = make_role_worker(role, self.engine, self.transport, disagg)
        self.deltas: list[TokenDelta] = []
        self.events: list[InstanceEvent] = []
        self.cond = threading.Condition()
        self.error: str | None = None
        self.num_inbox_tokens = 0  # prompt tokens submitted that the loop has not taken yet
        self.gc_pauses = GcPauses()
        self.num_frozen = freeze_startup_objects()  # what start-up made, no full collection walks it again
        self.loop = StepLoop(self.worker, self, name=f"step-loop-{instance_id}")
        if self.transport is not None:
            self.transport.on_ready = self.loop.wake  # a landed (or failed) transfer wakes the loop at once
        self.loop.start()

    def _make_transport(self, disagg: DisaggConfig):
        from cluster.disagg.transfer.transports import make_transport

        host = disagg.link_host
        if host == "auto":  # this node's address as Ray knows it: the one peers on other hosts reach
            import ray

            host = ray.util.get_node_ip_address()
        transport = make_transport("torchdist", endpoint_id=self.instance_id, host=host,
                                   backend=self.engine.platform.dist_backend, timeout_s=disagg.transfer_timeout_s,
                                   device=self.engine.device)
        transport.listen()
        return transport

    # -- (3) commands -----------------------------------------------------------
    def _call(self, fn, timeout_s: float = 30.0):
        self._check()
        return self.loop.call(fn, timeout_s)

    def _check(self) -> None:
        if self.error:
            raise RuntimeError(f"instance {self.instance_id} failed: {self.error}")

    def info(self) -> dict:
        stats = self.engine.stats()
        return {"instance_id": self.instance_id, "role": self.role.value, "num_blocks": stats.num_blocks,
                "block_size": self.engine.kv_layout.block_size, "max_model_len": self.engine.max_model_len,
                "prefill_tokens_per_s": self.prefill_rate_at_start, "link_address": self.worker.link_address(),
                "startup_s": self.startup_s}

    def connect(self, peer_id: str, address: str, is_master: bool, link_key: str | None = None) -> bool:
        """Make a KV link to a peer instance (both sides are called at once, with the same `link_key`; blocks
        until joined). A link this side still has to the peer is replaced: the router asks only for a pair
        it holds unlinked (a new router after a crash, a peer that dropped its side or switched roles), and
        a side that kept its old link while the other dials a new one would leave the other waiting."""
        if self.transport.has_link(peer_id):
            self.transport.disconnect(peer_id)
        self.transport.connect(peer_id, address, is_master, link_key)
        return True

    def adopt(self) -> dict:
        """A new router takes this instance over (detached instances, runtime/adopt.py): the requests the
        last one placed here went with it (their clients' connections died with its process), so each is
        aborted and its blocks freed; its KV links go too (the new router makes its own). Returns `info`."""
        def forget_requests():
            for request_id in list(self.engine.active_request_ids()):
                self.worker.abort(request_id)

        self._call(forget_requests)
        if self.transport is not None:
            self.transport.close()  # a prefill copy still waiting on a confirmation fails and is freed
        with self.cond:
            self.deltas, self.events = [], []
        return {**self.info(), "engine_config": self.launch_config}

    def disconnect(self, peer_id: str) -> None:
        if self.transport is not None:
            self.transport.disconnect(peer_id)

    def submit(self, spec: RequestSpec) -> None:
        self._admit(spec, lambda: self.worker.submit(spec))

    def submit_prefill(self, spec: RequestSpec, peer_id: str, transfer_id: int) -> None:
        self._admit(spec, lambda: self.worker.submit_prefill(spec, peer_id, transfer_id))

    def _admit(self, spec: RequestSpec, add) -> None:
        """`add` a prompt on the loop. Until the loop takes it (after the step in progress: 0.2 s for a
        prefill of four 2k prompts on an H200) it counts among the queued prompt tokens the heartbeat
        reports; else the router, which forgets what it dispatched at each heartbeat, would not see it."""
        num_tokens, submitted_s = len(spec.prompt_token_ids), time.monotonic()
        with self.cond:
            self.num_inbox_tokens += num_tokens

        def take():
            with self.cond:
                self.num_inbox_tokens -= num_tokens
            add()
            self.loop.queue_times.submitted(spec.request_id, submitted_s)

        self._call(take)

    def reserve(self, spec: RequestSpec, peer_id: str, transfer_id: int) -> bool:
        return self._call(lambda: self.worker.reserve(spec, peer_id, transfer_id))

    def confirm(self, request_id: str) -> None:
        """Marks the transfer confirmed at once, on the calling Ray thread (a state the loop reads at its
        next poll): through the loop's inbox it waited for the step in progress, a prefill of up to
        0.2 s, and so did the router."""
        self._check()
        self.worker.confirm(request_id)
        self.loop.wake()

    def abort(self, request_id: str) -> None:
        self._call(lambda: self.worker.abort(request_id))

    def set_role(self, role: Role, disagg: DisaggConfig) -> None:
        """Serve as `role` from now on (prefill <-> decode), on the same engine and KV link endpoint: the
        autoscaler's role flip, once the router drained the instance. Refused while it holds requests."""
        if Role.MIXED in (role, self.role) and role != self.role:
            raise ValueError("a mixed instance has no KV link: only prefill and decode instances switch roles")

        def switch():
            if self.worker.waiting_on_network():
                raise ValueError(f"instance {self.instance_id} still has KV transfers in flight")
            self.engine.set_role(role)
            self.worker = make_role_worker(role, self.engine, self.transport, disagg)
            self.loop.worker = self.worker
            self.role = role

        self._call(switch)

    def stats(self) -> dict:
        """Read on a Ray thread while the loop thread steps (the engine copies what it iterates)."""
        stats = self.engine.stats().as_dict()
        stats["num_queued_prefill_tokens"] += self.num_inbox_tokens
        stats.update(self.loop.meter.drain())  # step times, the prefill rate of a saturated window, stalls
        stats["queue_times_s"] = self.loop.queue_times.drain()
        stats["max_gc_ms"] = self.gc_pauses.take_max_ms()
        stats.update(self.worker.stats())
        return stats

    def ping(self) -> str:
        if self.error:
            raise RuntimeError(self.error)
        return self.instance_id

    def prefix_hashes(self) -> list[int]:
        return self.engine.cached_prefix_hashes()

    # -- (4) results -----------------------------------------------------------------
    def next_deltas(self, timeout_s: float = 0.5) -> tuple[list[TokenDelta], list[InstanceEvent], str | None]:
        with self.cond:
            if not self.deltas and not self.events and not self.error:
                self.cond.wait(timeout=timeout_s)
            deltas, events = self.deltas, self.events
            self.deltas, self.events = [], []
        return deltas, events, self.error

    def shutdown(self) -> None:
        self.loop.stop()
        self.gc_pauses.close()

    # -- (2) the loop's listener (loop thread) --------------------------------------------
    def on_step(self, deltas: list[TokenDelta], events: list[InstanceEvent]) -> None:
        if deltas or events:
            with self.cond:
                self.deltas.extend(deltas)
                self.events.extend(events)
                self.cond.notify_all()

    def on_error(self, exc: Exception) -> bool:
        """The instance is dead: every request on it must learn so."""
        self.error = "".join(traceback.format_exception(exc, limit=6))
        with self.cond:
            self.cond.notify_all()
        return False


def error_delta(request_id: str, index: int, message: str) -> TokenDelta:
    return TokenDelta(request_id, index, [], "", finish_reason=FinishReason.ERROR, error=message)
