"""One engine instance: three nouns and a loop.

  Scheduler     decides *what* runs          (engine/scheduler.py, no torch)
  KVCacheManager decides *where* KV lives     (engine/kv_cache.py)
  ModelRunner   decides *how* it runs        (engine/runner.py; behind an Executor,
                                              engine/executor.py, when the instance spans ranks)

A request's life:
  (1) `add_request` validates it, makes its `n` sequences and queues them;
  (2) `step` = schedule -> run -> update: one flat batch of prefill chunks and
      decodes, one token sampled for every sequence whose known tokens are all
      computed;
  (3) new tokens are detokenized incrementally; stop strings cut the text;
  (4) finished sequences free their blocks (a prefill-role sequence keeps them
      until `release`: its KV leaves through the engine's `KVSink`, kv_boundary.py);
  (5) each step returns the `TokenDelta`s it produced, which `LLM.generate`
      accumulates and the API streams.

Async scheduling (`RunnerConfig.async_scheduling`, mixed and decode roles): a step is
launched, then the previous step's tokens are read back and emitted while it runs, so
the device does not wait for the host's bookkeeping between steps:

    host    | sched N+1, launch | read N, emit N | sched N+2, launch | read N+1, emit ...
    device  |   ... step N ...      | step N+1                 | step N+2

Step N+1's inputs name step N's tokens as placeholders, filled in on the device
(scheduler.advance, runner.upload). Deltas come out one step later than launched.

With pp stages the running sequences take turns in pp batches: a step's layers are
launched, and only then is the previous batch's step finished (its rows waited for,
sampled), so every stage works on some batch instead of waiting for the one it just
passed on. Each batch's tokens still come back before its next step needs them.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from cluster.config import EngineConfig
from cluster.engine.executor import make_executor
from cluster.engine.kv_boundary import KVBlocks, KVLayout, KVReservation, KVSink
from cluster.engine.kv_cache import KVCacheManager
from cluster.engine.kv_export import KVStreamer
from cluster.engine.kv_handover import cache_dtype
from cluster.engine.scheduler import Scheduler
from cluster.engine.sequence import Sequence
from cluster.engine.stats import EngineStats, StepStats
from cluster.engine.stop import TextState
from cluster.models.registry import arch_config
from cluster.platform import current_platform
from cluster.types import FinishReason, Role, SamplingParams, TokenDelta


class EngineOverloaded(RuntimeError):
    """The waiting queue is full: the caller should retry later (HTTP 429/503)."""


@dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: list[Sequence]
    texts: list[TextState]
    arrival_s: float = field(default_factory=time.monotonic)


class Engine:
    def __init__(self, config: EngineConfig, role: Role = Role.MIXED, tokenizer=None, progress: bool = True):
        self.config = config
        self.role = role
        self.platform = current_platform(config.runner.device)
        self.device = self.platform.device()
        self.dtype = self.platform.resolve_dtype(config.model.dtype)
        self.arch = arch_config(config.model.path)
        self.max_model_len = resolve_max_len(config, self.arch)
        self.vocab_size = self.arch.vocab_size
        self.tokenizer = tokenizer
        eos = frozenset(self.arch.eos_token_ids) | (tokenizer.eos_token_ids if tokenizer else frozenset())
        self.eos_token_ids = eos
        torch.manual_seed(config.model.seed)
        # one process, or the driver of tp x pp ranks (executor.py); either way rank 0's runner samples
        self.executor = make_executor(config, self.platform, self.dtype, self.arch, self.max_model_len, eos, progress)
        self.model, self.runner = self.executor.model, self.executor.runner
        self.kv = KVCacheManager(self.executor.num_blocks, config.cache.block_size, config.cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.kv, eos)
        self.async_scheduling = config.runner.async_scheduling and role != Role.PREFILL
        self.requests: dict[str, RequestState] = {}
        self.kv_layout = KVLayout(self.arch.num_layers, self.kv.block_size, self.arch.num_kv_heads,
                                  self.arch.head_dim, cache_dtype(self.runner))
        self.kv_out: KVStreamer | None = None  # prefill role: hands each message of KV to its sink as it is written
        self.forwarded: deque[_InFlight] = deque()  # async scheduling: launched steps not sampled yet (pp > 1)
        self.max_steps_in_flight = 0  # the most launched steps ever waiting at once (pp: batches in the stages)
        self.in_flight: _InFlight | None = None  # async scheduling: the sampled step not read back yet

    # -- (1) admission ---------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    prompt: str | None = None) -> None:
        self.validate(request_id, prompt_token_ids, params)
        if len(self.scheduler.waiting) + params.n > self.config.scheduler.max_waiting:
            raise EngineOverloaded(f"engine queue is full ({len(self.scheduler.waiting)} waiting)")
        now = time.monotonic()
        seqs: list[Sequence] = []
        for index in range(params.n):
            seq = Sequence(request_id, index, list(prompt_token_ids), params, now, self.max_model_len,
                           parent=seqs[0] if seqs else None, stop_after_prefill=self.role == Role.PREFILL)
            seqs.append(seq)
            self.scheduler.add(seq)
        texts = [TextState(self.tokenizer, prompt_token_ids, params) for _ in seqs]
        self.requests[request_id] = RequestState(request_id, prompt, list(prompt_token_ids), seqs, texts, now)

    def validate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if not prompt_token_ids:
            raise ValueError("prompt is empty: at least one token is needed")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(f"prompt is {len(prompt_token_ids)} tokens; the model's context is {self.max_model_len} "
                             f"tokens and at least one must be left to generate")
        vocab = self.arch.vocab_size
        bad = next((t for t in prompt_token_ids if not isinstance(t, int) or not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"prompt token id {bad!r} is outside the vocabulary [0, {vocab})")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this engine has none (use stop_token_ids)")

    def abort(self, request_id: str) -> None:
        state = self.requests.pop(request_id, None)
        if state is None:
            return
        for seq in state.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, FinishReason.ABORT)
            elif seq.finish_reason == FinishReason.PREFILLED:
                self.scheduler.release(seq)
            self.runner.forget(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0 or self.in_flight is not None or bool(self.forwarded)

    # -- (2)-(5) one step ----------------------------------------------------------
    def step(self) -> list[TokenDelta]:
        if not self.async_scheduling:  # (switched off at run time: the steps in flight are read first)
            self.scheduler.num_groups = 1
            return self._read_all() + self._step_sync()
        # pp stages: that many batches in the pipeline at once, taking turns
        self.scheduler.num_groups = self.executor.steps_in_flight
        sched = self.scheduler.schedule()
        if not sched.is_empty:
            forward = self.executor.launch_forward(sched)
            self.forwarded.append(_InFlight(forward, self.scheduler.advance(sched), [i.seq for i in sched.scheduled]))
            self.max_steps_in_flight = max(self.max_steps_in_flight, len(self.forwarded))
        sampled = None
        if self.forwarded and (len(self.forwarded) >= self.executor.steps_in_flight or sched.is_empty):
            sampled = self._finish(self.forwarded.popleft())
        deltas = self._read_back()
        self.in_flight = sampled
        return deltas

    def _finish(self, step: "_InFlight") -> "_InFlight":
        """A launched step's rows waited for and sampled (its tokens then on their way to the host)."""
        step.pending = self.executor.finish(step.pending)
        for seq in step.seqs:
            seq.in_forward = False
        return step

    def _read_all(self) -> list[TokenDelta]:
        """Every launched step finished and read back, oldest first."""
        deltas = self._read_back()
        while self.forwarded:
            self.in_flight = self._finish(self.forwarded.popleft())
            deltas += self._read_back()
        return deltas

    def _step_sync(self) -> list[TokenDelta]:
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return []
        hook = self.kv_out.begin_step(sched) if self.kv_out is not None else None
        result = self.executor.execute(sched, hook)
        if self.kv_out is not None:
            self.kv_out.end_step()
        self.scheduler.update(sched, result.sampled)
        deltas = [self._emit(item.seq, item.seq.token_ids[-1], result.logprobs.get(item.seq.seq_id))
                  for item in sched.scheduled if item.samples]
        if self.role != Role.PREFILL:  # prefill-role requests stay until `release`
            self._drop_finished(deltas)
        return deltas

    def _read_back(self) -> list[TokenDelta]:
        """The step in flight: wait for its tokens (only for them), put them in place of their
        placeholders, stop what they end, emit them. Sequences aborted meanwhile are skipped."""
        step, self.in_flight = self.in_flight, None
        if step is None:
            return []
        result = step.pending.result()
        deltas = []
        for seq, index in step.samples:
            if seq.is_finished or seq.request_id not in self.requests:
                continue
            token = result.sampled[seq.seq_id]
            self.scheduler.resolve(seq, index, token)
            deltas.append(self._emit(seq, token, result.logprobs.get(seq.seq_id)))
            if seq.is_finished:  # a stop string
                self.scheduler.end_at(seq, index + 1)
        self._drop_finished(deltas)
        return deltas

    def _drop_finished(self, deltas: list[TokenDelta]) -> None:
        for delta in deltas:
            state = self.requests.get(delta.request_id)
            if state and all(s.is_finished for s in state.seqs):
                del self.requests[delta.request_id]

    def _emit(self, seq: Sequence, token_id: int, logprob) -> TokenDelta:
        state = self.requests[seq.request_id]
        text = state.texts[seq.index]
        new_text, stop = text.push(token_id)
        if seq.is_finished and stop is None and seq.finish_reason != FinishReason.PREFILLED:
            tail, stop = text.flush()
            new_text += tail
            if stop is not None and seq.finish_reason != FinishReason.PREFILLED:
                seq.finish_reason, seq.stop_reason = FinishReason.STOP, stop
        if stop is not None and not seq.is_finished:
            self.scheduler.finish(seq, FinishReason.STOP, stop)
            new_text += text.flush()[0]
        elif stop is not None and seq.finish_reason == FinishReason.PREFILLED:
            # prefill role: the first token's text already holds a stop string, so the request ends
            # here and nothing needs decoding (sends in flight copied their KV; the blocks can go)
            seq.finish_reason, seq.stop_reason = FinishReason.STOP, stop
            self.scheduler.release(seq)
        if seq.is_finished and seq.finish_reason != FinishReason.PREFILLED:
            self.runner.forget(seq)
        delta = TokenDelta(seq.request_id, seq.index, [token_id], new_text,
                           [logprob] if logprob is not None else None, seq.finish_reason, seq.stop_reason,
                           seq.num_prompt_tokens, seq.num_cached_tokens)
        return delta

    # -- prefill role: hand the KV over (kv_boundary.py) ------------------------------------
    def set_kv_sink(self, sink: KVSink) -> None:
        """From now on the KV of each prompt that completes leaves through `sink`, message by message."""
        parallel = self.config.parallel
        self.kv_out = KVStreamer(sink, self.executor, self.kv_layout, parallel.world_size > 1,
                                 parallel.pipeline_parallel_size > 1)

    def export_kv(self, request_id: str) -> KVBlocks:
        """A prefilled request's KV, read out of the cache (every layer, every KV head), and its first token."""
        seq = self.requests[request_id].seqs[0]
        if seq.finish_reason != FinishReason.PREFILLED:
            raise ValueError(f"request {request_id!r} has not finished its prefill (status {seq.status.value})")
        layers = self.executor.gather_kv(seq.block_ids[: self.kv_layout.num_blocks(seq.num_prompt_tokens)])
        return KVBlocks(request_id, list(seq.prompt_token_ids), seq.token_ids[-1], layers)

    def release(self, request_id: str) -> None:
        """The decode side confirmed (or the hand-over timed out, or the request went away): free the
        KV. A request whose prompt is still being computed is aborted, never left scheduled on freed
        blocks."""
        self.abort(request_id)

    # -- decode role: admit a request whose KV arrives from elsewhere ----------------------
    def reserve(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                prompt: str | None = None) -> KVReservation | None:
        """Reserve blocks for the prompt's KV before any of it moves; None (nothing held) if the pool is short."""
        self.validate(request_id, prompt_token_ids, params)
        if params.n != 1:
            raise ValueError("disaggregated requests carry one sequence (n=1); the router splits n > 1")
        seq = Sequence(request_id, 0, list(prompt_token_ids), params, time.monotonic(), self.max_model_len)
        if not self.kv.allocate_slots(seq, seq.num_prompt_tokens):
            return None
        text = TextState(self.tokenizer, prompt_token_ids, params)
        self.requests[request_id] = RequestState(request_id, prompt, list(prompt_token_ids), [seq], [text])
        return KVReservation(request_id, seq.num_prompt_tokens, self.kv_layout)

    def import_kv(self, request_id: str, messages: list, first_token_id: int) -> None:
        """The prompt's KV landed (one tensor a message, each one layer [2, blocks, ...] or several stacked
        [k, 2, blocks, ...], in layer order): it goes into the reserved blocks of every rank, and the
        request joins the running batch after its first token."""
        seq = self.requests[request_id].seqs[0]
        self.executor.scatter_kv(seq.block_ids[: self.kv_layout.num_blocks(seq.num_prompt_tokens)], messages)
        self.commit(request_id, first_token_id)

    def commit(self, request_id: str, first_token_id: int) -> None:
        """All KV landed in the reserved blocks: the request joins the running batch after its first token."""
        state = self.requests[request_id]
        seq = state.seqs[0]
        self._append_first(state, first_token_id)
        seq.num_computed_tokens = seq.num_prompt_tokens
        stop = self.scheduler.check_stop(seq)  # the first token may already end it (max_tokens=1, eos)
        if stop is not None:
            self.scheduler.finish(seq, stop[0], stop[1])
            del self.requests[request_id]
            return
        self.kv.cache_full_blocks(seq)
        self.scheduler.add_running(seq)

    def recompute(self, request_id: str, first_token_id: int | None = None) -> None:
        """The KV never arrived: compute the prompt (and first token, if known) here. No request is lost."""
        state = self.requests[request_id]
        seq = state.seqs[0]
        self.kv.free(seq)
        seq.num_computed_tokens = 0
        if first_token_id is not None:
            self._append_first(state, first_token_id)
        self.scheduler.add(seq)

    def _append_first(self, state: RequestState, first_token_id: int) -> None:
        """The prefill side sampled and streamed the first token; continue the text after it."""
        seq, text = state.seqs[0], state.texts[0]
        if seq.num_output_tokens == 0:
            seq.append_token(first_token_id)
            text.push(first_token_id)
            text.num_emitted = max(0, len(text.text) - text.hold)  # what the prefill side emitted; the rest is ours

    def set_role(self, role: Role) -> None:
        """Serve as another role from now on, weights and KV pool kept (an autoscaler's role flip). Only
        an idle engine switches; a prefill role's KV sink goes (the new role's worker sets its own)."""
        if self.has_unfinished() or self.requests:
            raise ValueError(f"an engine switches roles only when idle ({len(self.requests)} requests held)")
        self.role = role
        self.async_scheduling = self.config.runner.async_scheduling and role != Role.PREFILL
        self.kv_out = None

    def shutdown(self) -> None:
        """Stop the instance's other ranks (a single-process engine has none)."""
        self.executor.shutdown()

    # -- stats (read by the runtime; `stats` may be called from another thread while the loop steps) --
    def stats(self) -> EngineStats:
        waiting = list(self.scheduler.waiting)  # copied in one C-level call: a step may admit meanwhile
        pool = self.kv.pool
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(waiting),
            # what those prompts will compute: less the prefix each would find cached (a resent prompt
            # computes one block, and counted in full it made the queue look seconds long)
            num_queued_prefill_tokens=sum(self._to_compute(seq) for seq in waiting),
            kv_usage=self.kv.usage(), num_free_blocks=self.kv.num_free_blocks, num_blocks=self.kv.num_blocks,
            prefix_hit_rate=self.kv.prefix_hit_rate(), num_prefix_queried_tokens=pool.num_queries,
            num_prefix_hit_tokens=pool.num_hits, num_preemptions=self.scheduler.num_preemptions)

    def _to_compute(self, seq: Sequence) -> int:
        return seq.num_uncomputed - (0 if seq.num_computed_tokens else self.kv.num_cached_prefix_tokens(seq))

    def step_stats(self) -> StepStats:
        """Counters a step loop reads after each step (step_meter.py)."""
        return StepStats(self.scheduler.num_prefill_tokens, self.scheduler.has_queued_prompts(),
                         tuple(self.scheduler.admitted))

    def active_request_ids(self):
        """The requests the engine holds (a live view)."""
        return self.requests.keys()

    def cached_prefix_hashes(self) -> list[int]:
        """The hashes of the full blocks in the prefix cache, oldest first (the router's prefix index)."""
        return list(self.kv.pool.cached)


@dataclass
class _InFlight:
    """A launched step: its tokens on their way, and where each goes (sequence, placeholder index)."""

    pending: object  # executor.launch_forward's handle, then (`_finish`) a runner.PendingStep
    samples: list[tuple[Sequence, int]]
    seqs: list[Sequence]  # every sequence the step computes for


def resolve_max_len(config: EngineConfig, arch) -> int:
    limit = arch.max_position_embeddings
    if arch.sliding_window:
        limit = min(limit, arch.sliding_window)  # no sliding-window attention: stay inside the window
    want = config.model.max_model_len
    if want is not None and want > limit:
        raise ValueError(f"ModelConfig.max_model_len={want} exceeds the checkpoint's context of {limit}")
    return want or limit
