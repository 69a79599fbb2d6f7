"""Decides what runs in each step. Imports no torch.

Each step (`schedule`):
  (1) running sequences that decode (one new token each) go first, oldest first;
  (2) running sequences part-way through a prompt get their next chunk;
  (3) waiting sequences are admitted first-come-first-served: prefix-cache hits
      are reused, the rest of the prompt is chunked under the token budget;
  (4) when the pool has no block for a running sequence, the newest running
      sequence is preempted (its KV freed, it recomputes later) until it fits.
After the model ran (`update`): computed counts advance, sampled tokens are
appended, finished sequences free their blocks, full blocks join the prefix cache.

Async scheduling splits `update` in two, so the next step is scheduled while this one runs:
`advance` right after the launch (computed counts move on, each sampling sequence gets a
placeholder token, `-(1 + row)`), `resolve` once the step's tokens reach the host (the
placeholder becomes the token, stops are checked). A sequence whose pending token will end it
by length is not scheduled again; one that turns out to stop otherwise drops the token the
next step computed for it.

With `num_groups` > 1 (pipeline stages, each working on another batch) a step takes at most
1/num_groups of the decoding sequences, and none still in a launched step whose tokens are
not sampled yet (`in_forward`): the running sequences fall into that many batches taking turns.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from cluster.config import SchedulerConfig
from cluster.engine.kv_cache import KVCacheManager
from cluster.engine.sequence import Sequence, SeqStatus
from cluster.types import FinishReason


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int
    samples: bool  # this chunk reaches the end of the known tokens: sample one


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, eos_token_ids: frozenset[int] = frozenset()):
        self.config = config
        self.num_groups = 1  # batches taking turns in the pipeline (the engine sets it per step)
        self.kv = kv
        self.eos_token_ids = eos_token_ids
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_prefill_tokens = 0  # prompt tokens scheduled so far (chunks and whole prompts, not decodes)
        # the request ids whose sequence the last `schedule` took off the queue for the first time (not
        # after a preemption): what an instance's queue-time figure reads after each step
        self.admitted: list[str] = []

    # -- admission -----------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self.waiting.append(seq)

    def add_running(self, seq: Sequence) -> None:
        """Decode role: a sequence whose KV blocks are already filled joins the batch."""
        seq.status = SeqStatus.RUNNING
        self.running.append(seq)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    # -- one step --------------------------------------------------------
    def has_queued_prompts(self) -> bool:
        """Prompt tokens are left to compute: a waiting prompt, or a running one only partly prefilled."""
        return bool(self.waiting) or any(seq.num_computed_tokens < seq.num_prompt_tokens for seq in self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        self.admitted = []
        budget = self.config.max_num_batched_tokens
        decodes = [s for s in self.running if s.num_uncomputed == 1]
        chunks = [s for s in self.running if s.num_uncomputed > 1 and not s.in_forward]
        if self.num_groups > 1:  # this step's share of the decodes: the others are in the stages
            decodes = [s for s in decodes if not s.in_forward][: -(-len(decodes) // self.num_groups)]
        for seq in decodes + chunks:
            if seq.status != SeqStatus.RUNNING or budget == 0 or (seq.num_pending and self.ends_by_length(seq)):
                continue
            num_new = self._chunk(seq, budget)
            if num_new == 0 or not self._reserve(seq, num_new, out):
                continue
            out.scheduled.append(ScheduledSeq(seq, num_new, seq.num_computed_tokens + num_new == seq.num_tokens))
            budget -= num_new
            if num_new > 1:
                self.num_prefill_tokens += num_new
        if not out.preempted:
            budget = self._admit_waiting(out, budget)
        return out

    def _chunk(self, seq: Sequence, budget: int) -> int:
        if seq.num_uncomputed <= budget:
            return seq.num_uncomputed
        return budget if self.config.enable_chunked_prefill else 0

    def _reserve(self, seq: Sequence, num_new: int, out: SchedulerOutput) -> bool:
        """Find blocks for `seq`, preempting the newest running sequences if needed."""
        while not self.kv.allocate_slots(seq, num_new):
            victim = self.running[-1]
            self._preempt(victim, out)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        out.scheduled = [s for s in out.scheduled if s.seq is not seq]
        self.kv.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SeqStatus.PREEMPTED
        self.waiting.appendleft(seq)
        out.preempted.append(seq)
        self.num_preemptions += 1

    def _admit_waiting(self, out: SchedulerOutput, budget: int) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            if seq.in_forward or not self._share_prefix(seq):  # (preempted while its step is in the stages)
                break
            num_new = self._chunk(seq, budget)
            if num_new == 0 or not self.kv.allocate_slots(seq, num_new):
                self.kv.free(seq)  # give back the prefix hits; retried next step
                seq.num_computed_tokens = 0
                break
            self.waiting.popleft()
            if seq.status == SeqStatus.WAITING:
                self.admitted.append(seq.request_id)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, num_new, seq.num_computed_tokens + num_new == seq.num_tokens))
            budget -= num_new
            self.num_prefill_tokens += num_new
        return budget

    def _share_prefix(self, seq: Sequence) -> bool:
        """Reuse KV from the prefix cache, or from the sibling whose prompt it shares (n > 1).

        A sibling waits (False) while its parent's prompt is still being computed,
        so the prompt's KV is computed once and shared.
        """
        parent = seq.parent
        if parent is not None and parent.status == SeqStatus.RUNNING:
            if parent.num_computed_tokens < parent.num_prompt_tokens:
                return False
            self.kv.fork(parent, seq)
            return True
        self.kv.match_prefix(seq)
        return True

    # -- after the model ran -----------------------------------------------
    def update(self, out: SchedulerOutput, sampled: dict[int, int]) -> list[Sequence]:
        """Advance computed counts, append sampled tokens (seq_id -> token); return sequences that finished."""
        finished = []
        for item in out.scheduled:
            seq = item.seq
            seq.num_computed_tokens += item.num_new_tokens
            if item.samples:
                seq.append_token(sampled[seq.seq_id])
                reason = self.check_stop(seq)
                if reason is not None:
                    self.finish(seq, reason[0], reason[1])
                    finished.append(seq)
                    continue
            self.kv.cache_full_blocks(seq)
        return finished

    # -- async scheduling: after the launch, and once the tokens are back -------------------
    def advance(self, out: SchedulerOutput) -> list[tuple[Sequence, int]]:
        """The step is queued on the device: count its tokens computed and give each sampling
        sequence a placeholder for its token. Returns (sequence, placeholder index) in sampling order."""
        pending = []
        for item in out.scheduled:
            seq = item.seq
            seq.in_forward = True  # until the engine has the step's tokens sampled
            seq.num_computed_tokens += item.num_new_tokens
            if item.samples:
                seq.token_ids.append(-(1 + len(pending)))
                seq.num_pending += 1
                pending.append((seq, seq.num_tokens - 1))
            self.kv.cache_full_blocks(seq)
        return pending

    def resolve(self, seq: Sequence, index: int, token_id: int) -> bool:
        """The token of the placeholder at `index` (the oldest pending) is `token_id`; True if it ends the sequence."""
        if index != seq.num_known_tokens:
            raise RuntimeError(f"sequence {seq.seq_id}: token {index} resolved out of order")
        seq.token_ids[index] = token_id
        seq.num_pending -= 1
        reason = self.check_stop(seq, index + 1)
        if reason is None:
            self.kv.cache_full_blocks(seq)
            return False
        self.end_at(seq, index + 1)
        self.finish(seq, reason[0], reason[1])
        return True

    @staticmethod
    def end_at(seq: Sequence, num_tokens: int) -> None:
        """`seq` ends with its token `num_tokens - 1`: a later step's placeholder goes, and the token
        that step computes is dropped."""
        del seq.token_ids[num_tokens:]
        seq.num_pending = 0
        seq.num_computed_tokens = min(seq.num_computed_tokens, num_tokens)

    @staticmethod
    def ends_by_length(seq: Sequence, num_tokens: int | None = None) -> bool:
        """`seq` with `num_tokens` tokens (default: all it has) has reached max_tokens or its context limit."""
        num_tokens = seq.num_tokens if num_tokens is None else num_tokens
        max_tokens = seq.params.max_tokens
        return (max_tokens is not None and num_tokens - seq.num_prompt_tokens >= max_tokens) or num_tokens >= seq.max_len

    def check_stop(self, seq: Sequence, num_tokens: int | None = None) -> tuple[FinishReason, int | None] | None:
        """Why `seq` ends with its token `num_tokens - 1` (default: its last), or None."""
        num_tokens = seq.num_tokens if num_tokens is None else num_tokens
        token = seq.token_ids[num_tokens - 1]
        num_output = num_tokens - seq.num_prompt_tokens
        params = seq.params
        if num_output >= params.min_tokens:
            if token in params.stop_token_ids:
                return FinishReason.STOP, token
            if not params.ignore_eos and token in self.eos_token_ids:
                return FinishReason.STOP, None
        if self.ends_by_length(seq, num_tokens):
            return FinishReason.LENGTH, None
        if seq.stop_after_prefill:
            return FinishReason.PREFILLED, None
        return None

    def finish(self, seq: Sequence, reason: FinishReason, stop_reason=None, free: bool = True) -> None:
        """End a sequence; a prefill-role sequence keeps its blocks until `release`."""
        if seq.status == SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        if reason == FinishReason.PREFILLED:
            self.kv.cache_full_blocks(seq)
        elif free:
            self.kv.free(seq)

    def release(self, seq: Sequence) -> None:
        """Prefill role: the decode side has the KV (or the hand-over timed out)."""
        if seq.block_ids:
            self.kv.free(seq)
