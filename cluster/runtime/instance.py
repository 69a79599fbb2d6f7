"""One instance as a Ray actor: an engine (mixed, prefill or decode role) and its step loop.

  (1) the actor builds its engine, its KV link endpoint and its role's worker;
  (2) a loop thread owns the engine: it drains the command inbox, runs a step,
      polls transfers, and publishes deltas; nothing else touches the engine;
  (3) Ray calls (submit, reserve, abort, connect...) only enqueue commands, and
      those that answer wait on a future the loop thread resolves between steps;
  (4) `next_deltas` is a long poll: the router gets every delta of every
      request on this instance in one call per step, not one call per token.

No Ray call happens inside the step loop; the loop never blocks on the network.
"""
from __future__ import annotations

import queue
import threading
import time
import traceback
from concurrent.futures import Future
from dataclasses import dataclass, replace

from cluster.config import DisaggConfig, EngineConfig
from cluster.runtime.admission import measure_prefill_rate
from cluster.runtime.gc_pauses import GcPauses, freeze_startup_objects
from cluster.runtime.step_meter import QueueTimes, StepMeter
from cluster.types import FinishReason, Role, SamplingParams, TokenDelta


@dataclass
class RequestSpec:
    """A request as the router hands it to an instance (plain data: crosses Ray)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None = None


def local_device_ids(assigned: list, num_visible: int) -> tuple[int, ...]:
    """This process's CUDA indices of the GPUs Ray assigned it. Ray either masks
    CUDA_VISIBLE_DEVICES to them (they are then 0..n-1 here) or, as the launcher asks
    (RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES), leaves every GPU of the host visible, and the
    assigned ids are the indices. NCCL between processes that see different GPU sets is slow to
    open P2P links and has hung on large messages (NVIDIA/nccl#1749), and CUDA IPC needs the peer's
    GPU visible, so the KV links and one-shot all-reduce want the second way."""
    ids = [int(i) for i in assigned]
    return tuple(range(len(ids))) if num_visible == len(ids) else tuple(ids)


def _on_assigned_gpus(engine_config: EngineConfig) -> EngineConfig:
    """On GPUs: the engine's ranks bind the devices Ray assigned this actor, rank 0 this process."""
    import torch

    if engine_config.runner.device == "cpu" or not torch.cuda.is_available():
        return engine_config
    import ray

    assigned = ray.get_gpu_ids()
    if not assigned:
        return engine_config
    device_ids = local_device_ids(assigned, torch.cuda.device_count())
    torch.cuda.set_device(device_ids[0])
    return replace(engine_config, runner=replace(engine_config.runner, device_ids=device_ids))


# what `stats()` says of the steps since the last call, worst case first: where a stream's pauses come
# from; and the decode side's count of recomputed prefills (each a failed transfer, run inside its
# decode steps), which /health and bench.serve report beside them
STALL_KEYS = ("max_step_ms", "max_step_gap_ms", "commands_ms", "max_gc_ms", "max_land_ms", "num_recomputed")


class InstanceActor:
    def __init__(self, instance_id: str, role: Role, engine_config: EngineConfig, disagg: DisaggConfig):
        from cluster.engine.engine import Engine
        from cluster.models.tokenizer import Tokenizer

        self.instance_id = instance_id
        self.role = role
        engine_config = _on_assigned_gpus(engine_config)
        tokenizer = Tokenizer.from_dir(engine_config.model.path)
        self.engine = Engine(engine_config, role=role, tokenizer=tokenizer, progress=False)
        self.worker = None
        self.transport = None
        # admission's prefill rate until this instance has had a queue to measure (admission.py)
        self.prefill_rate_at_start = None if role == Role.DECODE else measure_prefill_rate(
            self.engine, runs=2 if self.engine.device.type == "cuda" else 1)
        if role != Role.MIXED:
            self._make_worker(disagg)
        self.inbox: queue.Queue = queue.Queue()
        self.deltas: list[TokenDelta] = []
        self.events: list[tuple[str, str]] = []  # ("transfer_failed", request_id)
        self.cond = threading.Condition()
        self.error: str | None = None
        self.stopped = False
        self.meter = StepMeter()
        self.queue_times = QueueTimes()  # submitted -> first scheduled, per request
        self.num_inbox_tokens = 0  # prompt tokens submitted that the loop has not taken yet
        self.gc_pauses = GcPauses()
        self.num_frozen = freeze_startup_objects()  # what start-up made, no full collection walks it again
        self.loop = threading.Thread(target=self._loop, daemon=True, name=f"step-loop-{instance_id}")
        self.loop.start()

    def _make_worker(self, disagg: DisaggConfig) -> None:
        from cluster.disagg.decode import DecodeWorker
        from cluster.disagg.prefill import PrefillWorker
        from cluster.disagg.transfer.transports import make_transport

        backend = self.engine.platform.dist_backend
        self.transport = make_transport("torchdist", endpoint_id=self.instance_id, host=disagg.link_host,
                                        backend=backend, timeout_s=disagg.transfer_timeout_s, device=self.engine.device)
        self.transport.listen()
        self.transport.on_ready = self._wake  # a landed (or failed) transfer wakes the loop at once
        worker_cls = PrefillWorker if self.role == Role.PREFILL else DecodeWorker
        self.worker = worker_cls(self.engine, self.transport, disagg)

    # -- (3) commands -----------------------------------------------------------
    def _call(self, fn, *args, timeout_s: float = 30.0):
        if self.error:
            raise RuntimeError(f"instance {self.instance_id} failed: {self.error}")
        fut: Future = Future()
        self.inbox.put((fn, args, fut))
        self._wake()
        return fut.result(timeout=timeout_s)

    def info(self) -> dict:
        e = self.engine
        return {"instance_id": self.instance_id, "role": self.role.value, "num_blocks": e.kv.num_blocks,
                "block_size": e.kv.block_size, "max_model_len": e.max_model_len,
                "prefill_tokens_per_s": self.prefill_rate_at_start,
                "link_address": self.transport.listen() if self.transport else None}

    def connect(self, peer_id: str, address: str, is_master: bool) -> bool:
        """Make a KV link to a peer instance (both sides are called at once; blocks until joined)."""
        if not self.transport.has_link(peer_id):
            self.transport.connect(peer_id, address, is_master)
        return True

    def disconnect(self, peer_id: str) -> None:
        if self.transport is not None:
            self.transport.disconnect(peer_id)

    def submit(self, spec: RequestSpec) -> None:
        self._admit(spec, lambda: self.engine.add_request(spec.request_id, spec.prompt_token_ids, spec.params,
                                                          spec.prompt))

    def submit_prefill(self, spec: RequestSpec, peer_id: str, transfer_id: int) -> None:
        self._admit(spec, lambda: self.worker.submit(spec.request_id, spec.prompt_token_ids, spec.params, peer_id,
                                                     transfer_id, spec.prompt))

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
            self.queue_times.submitted(spec.request_id, submitted_s)

        self._call(take)

    def reserve(self, spec: RequestSpec, peer_id: str, transfer_id: int) -> bool:
        return self._call(lambda: self.worker.reserve(spec.request_id, spec.prompt_token_ids, spec.params, peer_id,
                                                      transfer_id, spec.prompt))

    def recompute(self, request_id: str, first_token_id: int | None) -> None:
        self._call(lambda: self.worker.recompute(request_id, first_token_id))

    def confirm(self, request_id: str) -> None:
        """Marks the transfer confirmed at once, on the calling Ray thread (a flag the loop reads at its
        next poll): through the loop's inbox it waited for the step in progress, a prefill of up to
        0.2 s, and so did the router."""
        if self.error:
            raise RuntimeError(f"instance {self.instance_id} failed: {self.error}")
        self.worker.confirm(request_id)
        self._wake()

    def abort(self, request_id: str) -> None:
        target = self.worker if self.worker is not None else self.engine
        self._call(lambda: target.abort(request_id))

    def stats(self) -> dict:
        """Read on a Ray thread while the loop thread steps: what is iterated is copied first in one
        C-level call (`list(deque)`), so a step that admits or preempts meanwhile cannot break the
        heartbeat ("deque mutated during iteration" would mark the instance dead)."""
        stats = dict(self.engine.stats())
        waiting = list(self.engine.scheduler.waiting)
        # what those prompts will compute: less the prefix each would find cached (a resent prompt
        # computes one block, and counted in full it made the queue look seconds long)
        stats["num_queued_prefill_tokens"] = self.num_inbox_tokens + sum(self._to_compute(s) for s in waiting)
        stats.update(self.meter.drain())  # step times, the prefill rate of a saturated window, stalls
        stats["queue_times_s"] = self.queue_times.drain()
        stats["max_gc_ms"] = self.gc_pauses.take_max_ms()
        if self.role == Role.PREFILL:
            stats["kv_bytes_sent"] = self.worker.bytes_sent
            stats["num_held_transfers"] = len(self.worker.plans)  # prefilled, KV kept until the decode side confirms
        if self.role == Role.DECODE:
            stats["num_recomputed"] = self.worker.num_recomputed
            # drained: each heartbeat reports the hand-overs that landed since the last one
            stats["transfer_latencies_s"], self.worker.transfer_latencies_s = self.worker.transfer_latencies_s, []
            stats["max_land_ms"], self.worker.max_land_s = self.worker.max_land_s * 1e3, 0.0
        return stats

    def _to_compute(self, seq) -> int:
        """The prompt tokens a waiting `seq` will compute: less the prefix it would find cached now."""
        return seq.num_uncomputed - (0 if seq.num_computed_tokens else self.engine.kv.num_cached_prefix_tokens(seq))

    def ping(self) -> str:
        if self.error:
            raise RuntimeError(self.error)
        return self.instance_id

    def prefix_hashes(self) -> list[int]:
        return list(self.engine.kv.pool.cached)

    # -- (4) results -----------------------------------------------------------------
    def next_deltas(self, timeout_s: float = 0.5) -> tuple[list[TokenDelta], list[tuple[str, str]], str | None]:
        with self.cond:
            if not self.deltas and not self.events and not self.error:
                self.cond.wait(timeout=timeout_s)
            deltas, events = self.deltas, self.events
            self.deltas, self.events = [], []
        return deltas, events, self.error

    def shutdown(self) -> None:
        self.stopped = True
        self.gc_pauses.close()
        self._wake()

    def _wake(self) -> None:
        with self.cond:
            self.cond.notify_all()

    # -- (2) the loop ------------------------------------------------------------------
    def _loop(self) -> None:
        from cluster.platform import bind_thread

        bind_thread(self.engine.device)
        try:
            while not self.stopped:
                self._drain_inbox()
                deltas = self._step()
                events = [("transfer_failed", r) for r in self.worker.take_failed()] if self.role == Role.DECODE else []
                if self.role == Role.PREFILL:
                    self.worker.poll()
                if deltas or events:
                    with self.cond:
                        self.deltas.extend(deltas)
                        self.events.extend(events)
                        self.cond.notify_all()
                if not deltas and not self._busy():
                    with self.cond:
                        if self.inbox.empty():
                            self.cond.wait(timeout=0.005 if self._waiting_on_network() else 0.05)
        except Exception:  # the instance is dead: every request on it must learn so
            self.error = traceback.format_exc(limit=6)
            with self.cond:
                self.cond.notify_all()

    def _step(self) -> list[TokenDelta]:
        if not (self._busy() or self._waiting_on_network()):
            self.meter.idle()
            return []
        prefilled = self.engine.scheduler.num_prefill_tokens
        t0 = time.perf_counter()
        deltas = self.worker.step() if self.worker is not None else self.engine.step()
        t1 = time.perf_counter()
        self.meter.record(t0, t1, self.engine.scheduler.num_prefill_tokens - prefilled, ran_model=bool(deltas),
                          prompts_queued=self.engine.scheduler.has_queued_prompts(), busy=self._busy())
        self.queue_times.check(self.engine.scheduler.admitted, time.monotonic(), self.engine.requests)
        return deltas

    def _busy(self) -> bool:
        return self.engine.has_unfinished()

    def _waiting_on_network(self) -> bool:
        if self.role == Role.DECODE:
            return bool(self.worker.pending or self.worker.failed)
        if self.role == Role.PREFILL:
            return bool(self.worker.plans)
        return False

    def _drain_inbox(self) -> None:
        t0, ran = time.perf_counter(), False
        while True:
            try:
                fn, args, fut = self.inbox.get_nowait()
            except queue.Empty:
                if ran:
                    self.meter.add_commands(time.perf_counter() - t0)
                return
            ran = True
            try:
                fut.set_result(fn(*args))
            except Exception as exc:  # a bad command fails its caller, not the instance
                fut.set_exception(exc)


def error_delta(request_id: str, index: int, message: str) -> TokenDelta:
    return TokenDelta(request_id, index, [], "", finish_reason=FinishReason.ERROR, error=message)
