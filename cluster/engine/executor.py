"""How an Engine's steps reach the devices: one process, or the ranks of a `tp x pp` instance.

The Engine calls, from its step loop:
  execute(sched, on_layer_done) -> StepResult   once per step: run the model, sample (a prefill's KV
                                                streams out: a per-layer callback on one process,
                                                a `LayerStreams` on several ranks)
  launch(sched) -> PendingStep                  the same, without waiting for the tokens (async
                                                scheduling: the next plan names them as placeholders)
  launch_forward(sched) / finish(forward)       launch in two halves, so that with pp > 1 the next
                                                batch enters the pipeline before this one's rows come
                                                back (`steps_in_flight` batches are in the stages)
  runner                                        the driver rank's ModelRunner (sampling state)
  gather_kv(block_ids) / scatter_kv(block_ids, messages)   the KV hand-over: every layer with all
                                                KV heads, from or into the ranks' head shards (a
                                                message is one layer or several stacked)
  model, num_blocks                             the driver rank's model; KV blocks every rank holds
  shutdown()                                    once, when the engine closes
Benchmarks and tests also call:
  set_flags(**changes)                          overlap / async sends / micro-batches, per step from now on
  stats(reset) -> dict                          expert load per layer, the all-reduce path in use

`UniExecutor` is today's single-process path, untouched: a ModelRunner.

`MultiProcExecutor` makes an instance of `tp * pp` ranks on one host:
  (1) it serves the rendezvous store and spawns ranks 1..N-1 (torch.multiprocessing,
      spawn; engine/ranks.py); the driver process itself is rank 0;
  (2) every rank builds its groups and its Worker (engine/worker.py); start-up runs on
      a helper thread while this one watches the ranks, so a rank that dies while
      loading fails the start at once, with its error;
  (3) each step: plan (host lists) -> header + payload to every rank through the step
      channel (shared memory, parallel/step_channel.py; the gloo host group where there is
      none) -> every rank executes it -> rank 0 samples. No Ray, no pickling, no spawning
      in the loop. A launched step (async scheduling) also broadcasts its sampled tokens,
      on the device, to the first stage's tp ranks: their next plan's placeholders;
  (4) a liveness thread polls the ranks; one that dies aborts the device groups (NCCL
      would wait on it until the timeout; gloo sees the closed socket) and the next or
      current step raises `InstanceFailed` naming the rank and its exit code or error;
  (5) `shutdown` broadcasts SHUTDOWN and joins the ranks (killing stragglers).
"""
from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import replace

import numpy as np
import torch

from cluster.config import EngineConfig
from cluster.engine.kv_budget import num_kv_blocks
from cluster.engine.kv_handover import LayerStreams, per_layer
from cluster.engine.runner import ModelRunner, PendingStep, StepResult
from cluster.engine.ranks import RankProcesses
from cluster.engine.step_plan import Command, pack, plan_step
from cluster.engine.worker import StepFlags, Worker
from cluster.models.registry import build_model
from cluster.parallel import step_channel
from cluster.parallel.groups import build_groups, serve_store
from cluster.parallel.step_channel import StepChannel

FAILURE_GRACE_S = 2.0  # after a collective error, how long to wait for the dead rank's exit code


class InstanceFailed(RuntimeError):
    """A rank of a multi-rank instance died or failed; the instance cannot run more steps."""


class Executor(ABC):
    runner: ModelRunner
    model: torch.nn.Module
    num_blocks: int
    steps_in_flight: int = 1  # batches the engine keeps in the pipeline at once (pp with async scheduling)

    @abstractmethod
    def execute(self, sched, on_layer_done=None) -> StepResult: ...

    @abstractmethod
    def launch(self, sched) -> PendingStep: ...

    def launch_forward(self, sched):
        """The step's layers queued; `finish` gets its tokens on their way (one process: both at once)."""
        return self.launch(sched)

    def finish(self, forward) -> PendingStep:
        return forward

    def set_flags(self, **changes) -> None:
        """Overlap switches, from the next step on (single process: nothing to switch)."""

    def stats(self, reset: bool = False) -> dict:
        return {}

    def shutdown(self) -> None:
        """Release the ranks (single process: nothing to do)."""


class UniExecutor(Executor):
    """One process, one device: the ModelRunner as it always was."""

    def __init__(self, config: EngineConfig, device: torch.device, dtype: torch.dtype, arch, max_model_len: int,
                 eos_token_ids: frozenset[int], progress: bool = True):
        self.model = build_model(config.model.path, dtype, device, max_model_len, progress=progress)
        self.num_blocks = num_kv_blocks(config, arch, self.model, device, dtype, max_model_len)
        self.runner = ModelRunner(self.model, self.num_blocks, config.cache.block_size, device, dtype,
                                  config.runner.attention_backend, eos_token_ids, config.runner.enable_cuda_graphs,
                                  config.runner.cuda_graph_max_batch, max_model_len)

    def execute(self, sched, on_layer_done=None) -> StepResult:
        return self.runner.execute(sched, on_layer_done)

    def launch(self, sched) -> PendingStep:
        return self.runner.launch(sched)

    def gather_kv(self, block_ids: list[int]) -> list[torch.Tensor]:
        index = self.runner.block_index(block_ids)
        return [self.runner.read_kv(layer, index) for layer in range(len(self.runner.kv_layers))
                if self.runner.kv_layers[layer] is not None]

    def scatter_kv(self, block_ids: list[int], messages: list[torch.Tensor]) -> None:
        """Every layer's KV of `block_ids`, in layer order: one write per message, of one layer or several."""
        index = self.runner.block_index(block_ids)
        layer_id = 0
        for kv in messages:
            if kv.dim() == 6:  # [k, 2, blocks, ...]: k layers in one index_copy_
                self.runner.write_kv_layers(layer_id, index, kv)
                layer_id += kv.shape[0]
            else:
                self.runner.write_kv(layer_id, index, kv)
                layer_id += 1


class MultiProcExecutor(Executor):
    def __init__(self, config: EngineConfig, platform, dtype: torch.dtype, max_model_len: int,
                 eos_token_ids: frozenset[int], progress: bool = True):
        parallel = config.parallel
        self.config = config
        self.flags = StepFlags(parallel.overlap_tp_comm, parallel.overlap_ep_comm, parallel.async_pp_send)
        self.num_microbatches = parallel.num_microbatches
        self.steps_in_flight = (parallel.pp_batches_in_flight or parallel.pipeline_parallel_size
                                if parallel.pipeline_parallel_size > 1 else 1)
        self.failure: str | None = None
        self.num_threads = torch.get_num_threads()  # CPU ranks share the cores while the instance lives
        self.store = serve_store(parallel.master_addr, parallel.master_port, parallel.world_size, parallel.collective_timeout_s)
        self.channel = StepChannel.create(parallel.world_size - 1) if step_channel.supported() else None
        self.ranks = RankProcesses(config, self.store, max_model_len, self.channel.spec() if self.channel else None)
        self.procs = self.ranks.procs
        try:
            self._start(platform, dtype, max_model_len, eos_token_ids, progress)
        finally:
            if self.channel is not None:
                self.channel.unlink()  # every rank mapped it before the start's collectives (or is gone)
        self.runner = self.worker.runner
        self.model = self.worker.model
        self.num_blocks = self.worker.num_blocks
        self._stop_watch = threading.Event()
        threading.Thread(target=self._watch, daemon=True, name="rank-liveness").start()

    # -- (2) start-up ----------------------------------------------------------------
    def _start(self, platform, dtype, max_model_len, eos_token_ids, progress) -> None:
        result: dict = {}

        def build() -> None:
            try:
                device = platform.bind(0, self.config.parallel.world_size, self.config.runner.device_ids)
                groups = build_groups(0, self.config.parallel, platform.dist_backend, self.store)
                result["worker"] = Worker(self.config, groups, device, dtype, max_model_len, eos_token_ids, progress)
            except BaseException as exc:  # handed to the caller's thread below
                result["error"] = exc

        helper = threading.Thread(target=build, daemon=True, name="rank0-start")
        helper.start()
        while helper.is_alive():
            helper.join(self.config.parallel.liveness_poll_s)
            dead = self._dead_ranks()
            if dead and helper.is_alive():
                self._kill_all()
                raise InstanceFailed(f"instance failed to start: {dead}")
        if "error" in result:
            dead = self._dead_ranks(wait_s=FAILURE_GRACE_S)  # a rank's own error explains rank 0's best
            self._kill_all()
            raise InstanceFailed(f"instance failed to start: {dead or result['error']}") from result["error"]
        self.worker = result["worker"]
        if platform.device_type == "cuda":
            torch.cuda.set_device(self.worker.device)  # current device is per thread

    # -- (3) one step --------------------------------------------------------------------
    def execute(self, sched, on_layer_done=None) -> StepResult:
        """`on_layer_done`: a prefill's `LayerStreams` (several ranks, one stage): the KV it names leaves
        in groups of layers during the step, gathered from the ranks as each group is written."""
        if on_layer_done is not None and not isinstance(on_layer_done, LayerStreams):
            raise TypeError("an instance of several ranks streams KV through LayerStreams, not a per-layer callback")
        if on_layer_done is not None and self.config.parallel.pipeline_parallel_size > 1:
            raise ValueError("a pipelined instance gathers its KV after the step (gather_kv), it does not stream it")
        return self._run(sched, share_tokens=False, streams=on_layer_done).result()

    def launch(self, sched) -> PendingStep:
        return self._run(sched, share_tokens=True)

    def launch_forward(self, sched):
        if self.steps_in_flight == 1:
            return self.launch(sched)
        return self._forward(sched, share_tokens=True, deferred=True)

    def finish(self, forward) -> PendingStep:
        """A step's rows waited for and sampled, its tokens shared with the first stage's tp ranks;
        a deferred step's FINISH tells the other ranks to do their part of it now."""
        if isinstance(forward, PendingStep):
            return forward
        plan, flags, step, batch = forward
        try:
            if flags.deferred:
                self._tell(pack(None, Command.FINISH, flags.encode())[0])
            logits = self.worker.finish(step)
            if logits is None:
                return PendingStep()
            pending = self.runner.sample_async(logits.float(), plan.sampling_seqs, batch)
            if flags.share_tokens:
                self.worker.share_tokens(self.runner.last_sampled)
            return pending
        except RuntimeError as exc:  # gloo / NCCL report a dead or stuck peer as RuntimeError (DistError)
            raise self._fail(exc) from exc

    def _run(self, sched, share_tokens: bool, streams: LayerStreams | None = None) -> PendingStep:
        return self.finish(self._forward(sched, share_tokens, deferred=False, streams=streams))

    def _forward(self, sched, share_tokens: bool, deferred: bool, streams: LayerStreams | None = None) -> tuple:
        self._check_alive()
        plan = plan_step(sched, self.config.cache.block_size)
        if streams is not None:  # every rank learns which rows' KV leaves; rank 0's worker hands it to the sink
            row_of = {item.seq.seq_id: row for row, item in enumerate(sched.scheduled)}
            plan.streams = [(row_of[seq.seq_id], num_blocks, per_group) for seq, num_blocks, per_group in streams.entries]
        flags = replace(self.flags, share_tokens=share_tokens and bool(plan.logits_indices), deferred=deferred)
        header, payload = pack(plan, Command.STEP, flags.encode(), self.num_microbatches)
        batch = self.runner.sampling_batch(plan.sampling_seqs)  # as of now: `finish` may come after `advance`
        self.worker.kv_sink = streams.sink if streams is not None else None
        try:
            self._tell(header, payload)
            return plan, flags, self.worker.forward(plan, flags, self.num_microbatches), batch
        except RuntimeError as exc:  # gloo / NCCL report a dead or stuck peer as RuntimeError (DistError)
            raise self._fail(exc) from exc
        finally:
            self.worker.kv_sink = None

    def _tell(self, header: torch.Tensor, payload: torch.Tensor | None = None) -> None:
        """The other ranks get (header, payload): through the step channel, or the host group when
        there is none or the message does not fit a slot (the ranks are told to look there)."""
        if self.channel is not None:
            message = header.numpy() if payload is None else np.concatenate([header.numpy(), payload.numpy()])
            if self.channel.send(message, self._check_alive, self.config.parallel.collective_timeout_s):
                return
        host = self.worker.groups.host
        host.broadcast(header)
        if payload is not None:
            host.broadcast(payload)

    def gather_kv(self, block_ids: list[int]) -> list[torch.Tensor]:
        """Every layer's KV of `block_ids`, all heads, on this (driver) rank: the KV hand-over's source."""
        return self._kv_command(Command.GATHER_KV, block_ids, lambda: self.worker.gather_kv(block_ids))

    def scatter_kv(self, block_ids: list[int], messages: list[torch.Tensor]) -> None:
        """Land every layer's KV of `block_ids` ([2, blocks, block_size, all KV heads, head_dim] a layer,
        one or several a message, from another instance whatever its tp) into the ranks' head shards:
        the KV hand-over's sink."""
        layers = per_layer(messages)
        self._kv_command(Command.SCATTER_KV, block_ids, lambda: self.worker.scatter_kv(block_ids, layers))

    def _kv_command(self, command: Command, block_ids: list[int], run):
        """Tell every rank to take part in a KV hand-over of `block_ids`, then take part (rank 0)."""
        self._check_alive()
        try:
            self._tell(torch.tensor([int(command), 0, len(block_ids), 0, 0, 0, 1, 0], dtype=torch.int64),
                       torch.tensor(block_ids, dtype=torch.int64))
            return run()
        except RuntimeError as exc:
            raise self._fail(exc) from exc

    def set_flags(self, **changes) -> None:
        num_microbatches = changes.pop("num_microbatches", None)
        if num_microbatches is not None:
            self.num_microbatches = num_microbatches
        self.flags = replace(self.flags, **changes)

    def stats(self, reset: bool = False) -> dict:
        """Tokens routed to each expert of each layer, summed over ranks; which all-reduce path runs."""
        self._check_alive()
        header, _ = pack(None, Command.STATS, int(reset))
        host = self.worker.groups.host
        try:
            self._tell(header)
            rows = host.gather_to_first(self.worker.stats_vector(reset))
        except RuntimeError as exc:
            raise self._fail(exc) from exc
        table = torch.stack(rows)
        arch = self.worker.arch
        experts = table.sum(0).view(arch.num_layers, -1)
        groups = self.worker.groups
        one_shot = groups.tp.one_shot
        return {"tokens_per_expert": experts.long().tolist() if arch.num_experts else [],
                "one_shot_all_reduce": groups.tp.one_shot is not None, "one_shot_error": groups.one_shot_error,
                # ParallelConfig.fuse_all_reduce_norm: the fused kernel runs (parallel/one_shot.py (5)), or why not
                "one_shot_norm": one_shot is not None and one_shot.norm_flags is not None,
                "one_shot_norm_error": one_shot.norm_error if one_shot is not None else None}

    # -- (4) liveness -------------------------------------------------------------------
    def _dead_ranks(self, wait_s: float = 0.0) -> str:
        return self.ranks.dead(wait_s)

    def _watch(self) -> None:
        while not self._stop_watch.wait(self.config.parallel.liveness_poll_s):
            if self.ranks.any_exited():
                self.failure = self.failure or f"instance failed: {self._dead_ranks()}"
                self.worker.groups.abort()
                return

    def _check_alive(self) -> None:
        if self.failure is None:
            dead = self._dead_ranks()
            if dead:
                self.failure = f"instance failed: {dead}"
        if self.failure is not None:
            raise InstanceFailed(self.failure)

    def _fail(self, exc: Exception) -> InstanceFailed:
        dead = self._dead_ranks(wait_s=FAILURE_GRACE_S)
        self.failure = self.failure or f"instance failed: {dead or f'{type(exc).__name__}: {exc}'}"
        self._kill_all()
        return InstanceFailed(self.failure)

    # -- (5) shutdown ----------------------------------------------------------------------
    def shutdown(self) -> None:
        if self._stop_watch.is_set():
            return
        self._stop_watch.set()
        if self.failure is None and not self._dead_ranks():
            try:
                header, _ = pack(None, Command.SHUTDOWN)
                self._tell(header)
            except RuntimeError:
                pass
        self.ranks.join()
        self._kill_all()
        self.worker.groups.abort()  # NCCL: drop the communicators now rather than in a destructor

    def _kill_all(self) -> None:
        self.ranks.kill()
        torch.set_num_threads(self.num_threads)


def make_executor(config: EngineConfig, platform, dtype: torch.dtype, arch, max_model_len: int,
                  eos_token_ids: frozenset[int], progress: bool = True) -> Executor:
    parallel = config.parallel
    parallel.check_model(num_heads=arch.num_heads, num_kv_heads=arch.num_kv_heads, num_layers=arch.num_layers,
                         intermediate_size=arch.intermediate_size, num_experts=arch.num_experts,
                         moe_intermediate_size=arch.moe_intermediate_size,
                         shared_expert_intermediate_size=arch.shared_expert_intermediate_size)
    if parallel.world_size == 1:
        return UniExecutor(config, platform.device(), dtype, arch, max_model_len, eos_token_ids, progress)
    return MultiProcExecutor(config, platform, dtype, max_model_len, eos_token_ids, progress)
