"""One sequence's state inside an engine (a request with `n > 1` has n of them).

No torch here: the scheduler and the KV manager work on these plain objects.

  num_computed_tokens  how many of `token_ids` already have KV in the cache
  token_ids            prompt + generated tokens
  block_ids            the KV blocks, in order, holding those tokens' KV

    token_ids:  [p0 p1 p2 p3 p4 p5 | o0 o1]       prompt 6, output 2
    computed:   <-------- 7 -------->             o1 was sampled, its KV not yet written
"""
from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

from cluster.types import FinishReason, SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # KV freed; will recompute prompt + output so far
    FINISHED = "finished"


_seq_ids = itertools.count()


@dataclass(eq=False)
class Sequence:
    request_id: str
    index: int  # which of the request's n completions
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_s: float
    max_len: int  # context cap: prompt + output never exceed it
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    token_ids: list[int] = field(init=False)
    status: SeqStatus = SeqStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at admission
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # chain hashes of full blocks, in order
    num_registered_blocks: int = 0  # leading blocks whose hash is already in the prefix cache
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    parent: "Sequence | None" = None  # n > 1: the sibling whose prompt KV this one shares
    # prefill role: stop after the first token and keep the KV for hand-over
    stop_after_prefill: bool = False
    # async scheduling: the last `num_pending` token ids are placeholders for tokens sampled by steps
    # whose results have not reached the host yet (scheduler.advance / resolve)
    num_pending: int = 0
    in_forward: bool = False  # in a launched step whose tokens are not sampled yet (pp: a batch in the stages)
    # step_plan.py's copy of block_ids as an array: (the list it copies, the array), rebuilt when either changes
    block_row_cache: tuple | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def num_known_tokens(self) -> int:
        """Tokens whose ids the host knows (all but the pending placeholders)."""
        return len(self.token_ids) - self.num_pending

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SeqStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
