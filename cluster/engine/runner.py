"""How a step runs on the device: inputs from the schedule, model forward, sampling.

  (1) `prepare` flattens the scheduled sequences into one token batch
      (prefill chunks and decodes back to back) with positions, KV slots,
      block tables and the rows whose last position samples (a `StepPlan`,
      step_plan.py), then `upload`s it;
  (2) the model runs once over the whole batch (a captured CUDA graph for
      pure-decode batches on GPU);
  (3) logits are computed only for sampling rows and handed to the sampler.

`launch` does (1)-(3) without waiting for the device and returns a `PendingStep`; the
engine's async scheduling plans the next step meanwhile. A token sampled by a step that
has not reached the host is a placeholder in the next plan's input ids, `-(1 + row)`:
`upload` swaps in row `row` of the previous step's sampled tokens on the device.

The runner owns the KV tensors; `kv_cache.KVCacheManager` owns the block ids.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from cluster.engine.attention.backends import make_backend
from cluster.engine.attention.base import AttentionMetadata, AttnInputs
from cluster.engine.cuda_graphs import DecodeGraphs
from cluster.engine.kv_blocks import gather_blocks, scatter_blocks
from cluster.engine.sampler import DeviceSample, Sampler, SamplingBatch
from cluster.engine.scheduler import SchedulerOutput
from cluster.engine.sequence import Sequence
from cluster.engine.stats import StartupClock
from cluster.engine.step_plan import StepPlan, plan_step
from cluster.engine.warm_up import warm_up
from cluster.parallel.experts import grouped_mm_runs
from cluster.platform import to_device_async
from cluster.types import TokenLogprob

log = logging.getLogger(__name__)


@dataclass
class StepInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    logits_indices: torch.Tensor
    sampling_seqs: list[Sequence]
    is_pure_decode: bool


@dataclass
class StepResult:
    sampled: dict[int, int]  # seq_id -> token id
    logprobs: dict[int, TokenLogprob]


class PendingStep:
    """A launched step whose sampled tokens may still be on their way to the host."""

    def __init__(self, seqs: list[Sequence] | None = None, sample: DeviceSample | None = None):
        self.seqs = seqs or []
        self.sample = sample.start_copy() if sample is not None else None
        self._result: StepResult | None = None

    def result(self) -> StepResult:
        """Waits for this step's tokens (not for anything queued after it)."""
        if self._result is None:
            if self.sample is None:
                self._result = StepResult({}, {})
            else:
                out = self.sample.to_host()
                self._result = StepResult({s.seq_id: t for s, t in zip(self.seqs, out.token_ids)},
                                          {s.seq_id: lp for s, lp in zip(self.seqs, out.logprobs) if lp is not None})
        return self._result


class ModelRunner:
    def __init__(self, model, num_blocks: int, block_size: int, device: torch.device, dtype: torch.dtype,
                 attention_backend: str = "auto", eos_token_ids: frozenset[int] = frozenset(),
                 enable_cuda_graphs: bool = False, cuda_graph_max_batch: int = 256, max_model_len: int = 4096,
                 startup: StartupClock | None = None):
        startup = startup or StartupClock()
        self.model = model
        self.device = device
        self.dtype = dtype
        self.block_size = block_size
        self.max_blocks_per_seq = -(-max_model_len // block_size)
        self.backend = make_backend(attention_backend, device)
        self.sampler = Sampler()
        self.eos_token_ids = eos_token_ids
        # one [2, blocks, block_size, kv_heads, head_dim] tensor per layer: K and V are its two halves,
        # so a hand-over reads or writes a layer's K and V of a set of blocks in one kernel
        with startup.phase("kv_cache"):
            self.kv_stack, self.first_kv_layer = allocate_kv(model, num_blocks, block_size, device, dtype)
        self.kv_layers = [None] * model.cfg.num_layers  # by global layer id (None: another stage's layer)
        for i, kv in enumerate(self.kv_stack.unbind(0)):
            self.kv_layers[self.first_kv_layer + i] = kv
        self.kv_caches = [(kv[0], kv[1]) if kv is not None else None for kv in self.kv_layers]
        self.generators: dict[int, torch.Generator] = {}
        self.last_sampled: torch.Tensor | None = None  # the last step's tokens, on the device: placeholders' values
        self.embeds_ids = True  # False on a later pipeline stage: it takes hidden states, its ids go unread
        self.graphs = None
        with startup.phase("warm_up"):
            warm_up(self, max_model_len)  # every kernel variant once, before graphs and before serving
        # MoE: the grouped-GEMM path never waits for the host and is captured; the per-expert loop
        # (no grouped GEMM on this device or dtype) reads the expert counts on the host, so it is not
        if enable_cuda_graphs and device.type == "cuda" and (not model.cfg.is_moe or grouped_mm_runs(device, dtype)):
            try:
                with startup.phase("cuda_graphs"):
                    self.graphs = DecodeGraphs(self, cuda_graph_max_batch)
            except RuntimeError as exc:  # MoE capture is new on GPUs: serve eagerly rather than not at all
                if not model.cfg.is_moe:
                    raise
                log.warning("MoE decode could not be captured as CUDA graphs, running eagerly: %s", exc)

    # -- (1) inputs ----------------------------------------------------------
    def prepare(self, sched: SchedulerOutput) -> StepInputs:
        return self.upload(plan_step(sched, self.block_size))

    def upload(self, plan: StepPlan) -> StepInputs:
        """A step plan (host lists, see step_plan.py) as device tensors: one pinned host buffer and
        one asynchronous copy, not a synchronous pageable copy per field (each of those waits for
        the device and costs a round trip on the step's critical path)."""
        fields = (plan.input_ids, plan.positions, plan.slot_mapping, plan.logits_indices, plan.query_start_loc,
                  plan.seq_lens)
        tables = plan.block_tables
        ids = np.asarray(plan.input_ids, dtype=np.int64)
        has_placeholders = bool(ids.size) and int(ids.min()) < 0
        parts = [ids] + [np.asarray(f, dtype=np.int64) for f in fields[1:]] + [tables.astype(np.int64).ravel()]
        # each field starts 16-byte aligned: Triton compiles a kernel variant per pointer alignment, so a
        # field at an odd offset (an odd token count before it) would compile one mid-serving
        sizes = [len(part) + len(part) % 2 for part in parts]
        host = torch.from_numpy(np.concatenate([np.pad(part, (0, size - len(part))) for part, size in zip(parts, sizes)]))
        data = to_device_async(host, self.device)
        input_ids, positions, slot_mapping, logits_indices, query_start, seq_lens, flat_tables = (
            chunk[: len(part)] for chunk, part in zip(torch.split(data, sizes), parts))
        if has_placeholders and self.embeds_ids:
            input_ids = self._fill_placeholders(input_ids)
        meta = AttentionMetadata(
            query_start_loc=query_start.to(torch.int32),
            seq_lens=seq_lens.to(torch.int32),
            block_tables=flat_tables.view(tables.shape).to(torch.int32),
            slot_mapping=slot_mapping,
            max_query_len=plan.max_query_len,
            max_seq_len=max(plan.seq_lens),
            query_start_loc_cpu=plan.query_start_loc,
            seq_lens_cpu=plan.seq_lens,
        )
        return StepInputs(
            input_ids=input_ids,
            positions=positions,
            meta=meta,
            logits_indices=logits_indices,
            sampling_seqs=plan.sampling_seqs,
            is_pure_decode=meta.max_query_len == 1,
        )

    def _fill_placeholders(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Ids `-(1 + row)` take row `row` of the previous step's sampled tokens, on the device."""
        if self.last_sampled is None or not self.last_sampled.numel():
            raise RuntimeError("the plan has placeholder tokens but no step has sampled on this rank")
        rows = (-input_ids - 1).clamp_(0, self.last_sampled.numel() - 1)
        return torch.where(input_ids < 0, self.last_sampled[rows], input_ids)

    # -- (2) forward -----------------------------------------------------------
    @torch.inference_mode()
    def forward(self, inputs: StepInputs, on_layer_done: Callable[[int], None] | None = None,
                hidden: torch.Tensor | None = None) -> torch.Tensor:
        """The model (or this pipeline stage's layers, from `hidden`) over the step's tokens. A
        captured graph's output is a static buffer, overwritten by the next replay of its size."""
        if self.graphs is not None and inputs.is_pure_decode and on_layer_done is None and self.graphs.fits(inputs):
            return self.graphs.replay(inputs, hidden)
        attn = AttnInputs(self.backend, inputs.meta, self.kv_caches, on_layer_done)
        return self.model(inputs.input_ids, inputs.positions, attn, hidden)

    # -- (3) sample --------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput, on_layer_done: Callable[[int], None] | None = None) -> StepResult:
        return self.launch(sched, on_layer_done).result()

    @torch.inference_mode()
    def launch(self, sched: SchedulerOutput, on_layer_done: Callable[[int], None] | None = None) -> PendingStep:
        """The step queued on the device, its tokens on their way to the host; nothing waits here."""
        inputs = self.prepare(sched)
        hidden = self.forward(inputs, on_layer_done)
        if not inputs.sampling_seqs:
            return PendingStep()
        logits = self.model.compute_logits(hidden[inputs.logits_indices]).float()
        return self.sample_async(logits, inputs.sampling_seqs)

    def sampling_batch(self, seqs: list[Sequence]) -> SamplingBatch:
        """What the sampler reads of `seqs`, as of now: taken when the step is planned, since a step
        sampled later (pp) finds its own placeholders appended by then (min_tokens would count them)."""
        return SamplingBatch(
            params=[s.params for s in seqs],
            generators=[self._generator(s) for s in seqs],
            prompt_token_ids=[s.prompt_token_ids for s in seqs],
            output_token_ids=[s.output_token_ids for s in seqs],
            eos_token_ids=self.eos_token_ids,
            pending_tokens=self.last_sampled,  # what this step's placeholders stand for, as of its plan
        )

    def sample_async(self, logits: torch.Tensor, seqs: list[Sequence], batch: SamplingBatch | None = None) -> PendingStep:
        """Queue the sampling; its tokens become `last_sampled` (the next plan's placeholders)."""
        sample = self.sampler.on_device(logits, batch or self.sampling_batch(seqs))
        self.last_sampled = sample.token_ids
        return PendingStep(seqs, sample)

    def _generator(self, seq: Sequence) -> torch.Generator | None:
        if seq.params.seed is None:
            return None
        gen = self.generators.get(seq.seq_id)
        if gen is None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seq.params.seed + seq.index)
            self.generators[seq.seq_id] = gen
        return gen

    def block_index(self, block_ids) -> torch.Tensor:
        """`block_ids` as a device index for read_kv/write_kv, made without a host sync (a pageable
        host-to-device copy would wait for every kernel queued so far: once per layer, that stalls
        a prefill that streams its KV layer by layer). Build it once and pass it to every layer."""
        if isinstance(block_ids, torch.Tensor):
            return block_ids
        return to_device_async(torch.tensor(block_ids, dtype=torch.int64), self.device)

    def read_kv(self, layer_id: int, block_ids) -> torch.Tensor:
        """Copy of one layer's K and V of `block_ids`, [2, len(block_ids), block_size, kv_heads, head_dim]:
        one gather, the KV hand-over's message."""
        return gather_blocks(self.kv_layers[layer_id], 1, self.block_index(block_ids))

    def read_kv_layers(self, start: int, end: int, block_ids, out: torch.Tensor | None = None) -> torch.Tensor:
        """Copy of layers [start, end)'s K and V of `block_ids`, [end - start, 2, len(block_ids), ...] (in
        `out` if given): one gather over the stage's single KV tensor, a stacked hand-over message."""
        first = self.first_kv_layer
        return gather_blocks(self.kv_stack[start - first : end - first], 2, self.block_index(block_ids), out)

    def write_kv_layers(self, start: int, block_ids, kv: torch.Tensor) -> None:
        """Layers [start, start + k) of `block_ids` from a stacked [k, 2, blocks, ...] message: one scatter."""
        first = self.first_kv_layer
        cache = self.kv_stack[start - first : start - first + kv.shape[0]]
        scatter_blocks(cache, 2, self.block_index(block_ids), kv)

    def write_kv(self, layer_id: int, block_ids, kv: torch.Tensor) -> None:
        scatter_blocks(self.kv_layers[layer_id], 1, self.block_index(block_ids), kv)

    def forget(self, seq: Sequence) -> None:
        self.generators.pop(seq.seq_id, None)


def kv_bytes_per_block(model, block_size: int, dtype: torch.dtype) -> int:
    cfg = model.cfg
    num_kv_heads = model.model.layers[next(iter(model.model.layers))].self_attn.num_kv_heads
    per_layer = 2 * block_size * num_kv_heads * cfg.head_dim * torch.tensor([], dtype=dtype).element_size()
    return per_layer * len(model.model.layers)


def allocate_kv(model, num_blocks: int, block_size: int, device: torch.device, dtype: torch.dtype):
    """(one [layers, 2 (K, V), blocks, block_size, kv_heads, head_dim] tensor for this stage's layers,
    the global id of its first layer). A layer's cache is a view of it, so a hand-over of several
    layers' KV is one gather, not one per layer and a stack."""
    layer_ids = sorted(int(layer_id) for layer_id in model.model.layers)
    if layer_ids != list(range(layer_ids[0], layer_ids[0] + len(layer_ids))):
        raise ValueError(f"a stage's layers must be consecutive, got {layer_ids}")
    attn = model.model.layers[str(layer_ids[0])].self_attn
    shape = (len(layer_ids), 2, num_blocks, block_size, attn.num_kv_heads, model.cfg.head_dim)
    return torch.zeros(shape, dtype=dtype, device=device), layer_ids[0]
