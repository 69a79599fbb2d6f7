"""One rank of a multi-rank instance: its share of the model and KV, and how a step runs on it.

  (1) `Worker(...)` builds its stage's layers with its tp/ep shard (each weight loader
      reads only its slice of the safetensors file), agrees with the other ranks on the
      KV block count (the minimum, over the host group) and allocates its KV;
  (2) `finish(forward(plan, flags, num_microbatches))` runs one step on this rank:
        pp == 1, overlap   two micro-batches taking turns, so one's all-reduce (TP) or
                           dispatch/combine (EP) is in flight while the other computes
        pp == 1            one forward (a captured CUDA graph for decodes when allowed)
        pp > 1             this stage's share of M micro-batches (parallel/pipeline.py)
      and returns full-vocab logits on the driver (world rank 0), None elsewhere. In two
      halves because with pp > 1 and async scheduling the driver sends the next
      step's STEP before this one's FINISH, so stage 0 queues the next batch's layers
      before it waits for this batch's rows to come back (the stages work on different
      batches, engine.py);
  (3) `worker_main` is a spawned rank's whole life: bind its device, build its groups
      and Worker, then loop: header, payload, forward and finish, until SHUTDOWN. An error is
      written to the rendezvous store (so the driver can name it) and the process exits;
      a rank whose driver is gone exits too.
"""
from __future__ import annotations

import collections
import os
import threading
import time
import traceback
from dataclasses import dataclass

import torch

from cluster.config import EngineConfig
from cluster.engine import kv_handover
from cluster.engine.attention.base import AttnInputs
from cluster.engine.kv_budget import num_kv_blocks
from cluster.engine.runner import ModelRunner
from cluster.engine.step_plan import HEADER_SIZE, Command, StepPlan, payload_size, split, unpack
from cluster.models.registry import arch_config, build_model
from cluster.parallel.groups import InstanceGroups, build_groups, dial_store
from cluster.parallel.overlap import OverlapFlags
from cluster.parallel.pipeline import run_stage, stage_ranges
from cluster.parallel.step_channel import StepChannel
from cluster.platform import current_platform

PARENT_POLL_S = 0.5


@dataclass(frozen=True)
class StepFlags:
    """Per-step switches the driver broadcasts in the header (so they can change at run time)."""

    overlap_tp: bool = False
    overlap_ep: bool = False
    async_pp: bool = True
    share_tokens: bool = False  # the driver broadcasts the sampled tokens: the next plan's placeholders
    deferred: bool = False  # the step's FINISH comes as a message of its own, after the next STEP

    def encode(self) -> int:
        return (self.overlap_tp | self.overlap_ep << 1 | self.async_pp << 2 | self.share_tokens << 3
                | self.deferred << 4)

    @staticmethod
    def decode(bits: int) -> "StepFlags":
        return StepFlags(*(bool(bits >> i & 1) for i in range(5)))


class Worker:
    def __init__(self, config: EngineConfig, groups: InstanceGroups, device: torch.device, dtype: torch.dtype,
                 max_model_len: int, eos_token_ids: frozenset[int] = frozenset(), progress: bool = False):
        parallel = config.parallel
        self.config = config
        self.groups = groups
        self.device = device
        self.dtype = dtype
        self.arch = arch_config(config.model.path)
        self.num_stages = parallel.pipeline_parallel_size
        self.stage_ranges = stage_ranges(self.arch, self.num_stages, parallel.pp_layer_partition)
        self.layer_range = layer_range = self.stage_ranges[groups.pipe.stage]
        groups.connect(device, dtype, parallel.one_shot_all_reduce_max_bytes)
        torch.manual_seed(config.model.seed)
        self.model = build_model(config.model.path, dtype, device, max_model_len, tp=groups.tp, ep=groups.ep,
                                 layer_range=layer_range, progress=progress)
        self.num_blocks = groups.host.min_int(num_kv_blocks(config, self.arch, self.model, device, dtype, max_model_len))
        # decode runs as captured graphs (a pipeline stage: its own layers, from a static input buffer);
        # all-to-all (host-synced splits) runs eagerly
        graphs = config.runner.enable_cuda_graphs and groups.ep.size == 1
        self.runner = ModelRunner(self.model, self.num_blocks, config.cache.block_size, device, dtype,
                                  config.runner.attention_backend, eos_token_ids, graphs,
                                  config.runner.cuda_graph_max_batch, max_model_len)
        self.runner.embeds_ids = groups.pipe.is_first
        self.num_split_steps = 0  # steps run as two overlapping micro-batches, or through the pipeline in several
        self.kv_sink = None  # the driver of a prefill instance: takes each streamed KV group (kv_handover.py)

    @torch.inference_mode()
    def gather_kv(self, block_ids: list[int]) -> list[torch.Tensor] | None:
        """Every layer's KV of `block_ids` with all heads on world rank 0 (kv_handover.py)."""
        return kv_handover.gather_kv(self, block_ids)

    @torch.inference_mode()
    def scatter_kv(self, block_ids: list[int], layers: list[torch.Tensor] | None) -> None:
        """`layers` (all heads, on world rank 0) into every rank's heads and layers (kv_handover.py)."""
        kv_handover.scatter_kv(self, block_ids, layers)

    # -- (2) one step -------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, plan: StepPlan, flags: StepFlags, num_microbatches: int = 1) -> tuple:
        """Queue this rank's layers of the step. With pp > 1 the rows that come back to stage 0
        are waited for (and turned into logits) only in `finish`."""
        if self.num_stages > 1:
            return self._pipelined(plan, flags, num_microbatches), flags
        streaming = kv_handover.stream_hook(self, plan)  # a prefill's KV groups, gathered as they are written
        if self._splits(plan, flags):
            logits = self._overlapped(plan, flags)
            for layer_id in range(self.arch.num_layers) if streaming else ():  # split: after both halves
                streaming(layer_id)
            return logits, flags
        inputs = self.runner.upload(plan)
        hidden = self.runner.forward(inputs, streaming)
        rows = hidden[inputs.logits_indices]
        return (self.model.compute_logits(rows) if plan.logits_indices else None), flags

    @torch.inference_mode()
    def finish(self, forwarded: tuple) -> torch.Tensor | None:
        """The step's logits on the driver (None elsewhere)."""
        logits, _flags = forwarded
        if isinstance(logits, list):  # stage 0 of a pipeline: each micro-batch's rows as they come back
            parts = []
            for pending in logits:
                if pending is not None:
                    parts.append(self.model.compute_logits(pending.wait()))
            logits = torch.cat(parts) if parts and parts[0] is not None else None
        return logits

    def _splits(self, plan: StepPlan, flags: StepFlags) -> bool:
        wanted = (flags.overlap_tp and self.groups.tp.size > 1) or (flags.overlap_ep and self.groups.ep.size > 1)
        return wanted and plan.num_tokens >= max(2, self.config.parallel.overlap_min_tokens)

    def _attn(self, inputs) -> AttnInputs:
        return AttnInputs(self.runner.backend, inputs.meta, self.runner.kv_caches)

    def _overlapped(self, plan: StepPlan, flags: StepFlags) -> torch.Tensor | None:
        self.num_split_steps += 1
        parts = [self.runner.upload(part) for part in split(plan, 2)]
        batches = [(i.input_ids, i.positions, self._attn(i), None) for i in parts]
        hiddens = self.model.forward_microbatches(batches, OverlapFlags(flags.overlap_tp, flags.overlap_ep))
        rows = torch.cat([h[i.logits_indices] for h, i in zip(hiddens, parts)])
        return self.model.compute_logits(rows) if plan.logits_indices else None

    def _pipelined(self, plan: StepPlan, flags: StepFlags, num_microbatches: int) -> list:
        plans = split(plan, num_microbatches)
        self.num_split_steps += len(plans) > 1
        parts = [self.runner.upload(p) for p in plans]
        is_last = self.groups.pipe.is_last

        def forward_part(m: int, hidden: torch.Tensor | None) -> torch.Tensor | None:
            inputs = parts[m]
            out = self.runner.forward(inputs, hidden=hidden)
            if not is_last:  # a graph's output is overwritten by the next micro-batch's replay: copy what is sent
                return out.clone()
            return out[inputs.logits_indices] if plans[m].logits_indices else None  # normed rows that sample

        sizes = [(p.num_tokens, len(p.logits_indices)) for p in plans]
        # stage 0: the pending receive of each micro-batch's returned rows (`finish` waits)
        return run_stage(self.groups.pipe, sizes, forward_part, self.arch.hidden_size, self.dtype, self.device,
                         flags.async_pp)

    def share_tokens(self, tokens: torch.Tensor | None) -> None:
        """A launched step's sampled tokens (int64, one per sampling row) from the driver to the
        first stage's tp ranks, on the device: what the next plan's placeholders stand for. Later
        stages take hidden states, not ids. On NCCL nothing here waits for the host."""
        if self.groups.pipe.stage != 0 or self.groups.tp.size == 1:
            return
        self.runner.last_sampled = self.groups.tp.broadcast_from_first(tokens)

    # -- statistics ----------------------------------------------------------------
    def stats_vector(self, reset: bool) -> torch.Tensor:
        """float64 [num_layers * num_experts]: tokens routed to each (layer, expert) counted on this rank."""
        arch = self.arch
        experts = torch.zeros(arch.num_layers, max(arch.num_experts, 1), dtype=torch.float64)
        for layer_id, layer in self.model.model.layers.items():
            counts = getattr(getattr(layer.mlp, "experts", None), "tokens_per_expert", None)
            if counts is not None:
                experts[int(layer_id)] = counts.double().cpu()
                if reset:
                    counts.zero_()
        return experts.flatten()


# -- (3) a spawned rank ----------------------------------------------------------------
def worker_main(world_rank: int, config: EngineConfig, store_port: int, parent_pid: int, max_model_len: int,
                channel_spec: tuple | None = None) -> None:
    _exit_with_parent(parent_pid)
    store = None
    try:
        # mapped before the start-up collectives: the driver unlinks the file once they are done
        channel = StepChannel.attach(channel_spec, world_rank - 1) if channel_spec is not None else None
        parallel = config.parallel
        platform = current_platform(config.runner.device)
        device = platform.bind(world_rank, parallel.world_size, config.runner.device_ids)
        dtype = platform.resolve_dtype(config.model.dtype)
        store = dial_store(parallel.master_addr, store_port, parallel.world_size, parallel.collective_timeout_s)
        groups = build_groups(world_rank, parallel, platform.dist_backend, store)
        worker = Worker(config, groups, device, dtype, max_model_len)
        serve(worker, channel)
    except BaseException as exc:  # report any failure by name, then leave: the driver fails the instance
        message = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
        if store is not None:
            try:
                store.set(f"error/{world_rank}", message)
            except Exception:  # the driver may be gone already
                pass
        os._exit(1)


def serve(worker: Worker, channel: StepChannel | None = None) -> None:
    """The step loop of a non-driver rank: the driver's messages say what to do."""
    host = worker.groups.host
    forwarded: collections.deque = collections.deque()  # deferred steps, oldest first: (forward, num sampling rows)
    while True:
        header, payload = _next_message(host, channel)
        command, bits, *_ = header.tolist()
        if command == Command.SHUTDOWN:
            return
        if command == Command.GATHER_KV:
            worker.gather_kv(payload(int(header[2])).tolist())
            continue
        if command == Command.SCATTER_KV:
            worker.scatter_kv(payload(int(header[2])).tolist(), None)
            continue
        if command == Command.STATS:
            host.gather_to_first(worker.stats_vector(reset=bool(bits)))
            continue
        if command == Command.FINISH:
            step, num_rows = forwarded.popleft()
            worker.finish(step)
            _share(worker, StepFlags.decode(bits), num_rows)
            continue
        flags = StepFlags.decode(bits)
        step = worker.forward(unpack(header, payload(payload_size(header))), flags, int(header[6]))
        if flags.deferred:
            forwarded.append((step, int(header[5])))
            continue
        worker.finish(step)
        _share(worker, flags, int(header[5]))


def _share(worker: Worker, flags: StepFlags, num_rows: int) -> None:
    if flags.share_tokens:
        worker.share_tokens(torch.empty(num_rows, dtype=torch.int64, device=worker.device))


def _next_message(host, channel: StepChannel | None):
    """(header, payload(n) -> the message's n int64s after the header), from the channel or the host group."""
    message = channel.recv() if channel is not None else None
    if message is not None:
        rest = torch.from_numpy(message[HEADER_SIZE:])
        return torch.from_numpy(message[:HEADER_SIZE]), lambda n: rest[:n]
    header = host.broadcast(torch.empty(HEADER_SIZE, dtype=torch.int64))
    return header, lambda n: host.broadcast(torch.empty(n, dtype=torch.int64))


def _exit_with_parent(parent_pid: int) -> None:
    """A rank whose driver died leaves at once instead of waiting on a broadcast forever."""
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()
