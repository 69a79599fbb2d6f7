"""A leg: one completion of a request as the cluster moves it between pools.

A disaggregated request with `n` completions has n legs (`<request>#<i>`); a mixed-pool
request has one leg carrying all n. A leg restarted elsewhere after a failure keeps its
queue (the client's stream) and gets a new id (`~<retry>`).
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from cluster.runtime.instance import RequestSpec, error_delta
from cluster.types import TokenDelta


@dataclass
class Leg:
    """One completion of a request as it moves through the pools."""

    leg_id: str
    index: int
    spec: RequestSpec
    queue: asyncio.Queue
    prefill_id: str | None = None
    decode_id: str | None = None
    first_token: int | None = None
    output_ids: list[int] = field(default_factory=list)
    held: list[TokenDelta] = field(default_factory=list)  # decode deltas that arrived before the first token
    retries: int = 0
    done: bool = False
    expect_prefill_token: bool = True  # False once decode recomputes without it (prefill lost)
    confirmed: bool = False
    finished_indices: set = field(default_factory=set)  # completions of this leg that have ended
    reserving: bool = False  # being placed (a decode reservation not answered yet): its first token waits
    early_first: TokenDelta | None = None  # prefill's first token, held while `reserving`

    def fail(self, message: str) -> None:
        """End every completion of this leg that has not ended, with an error the client sees."""
        indices = [self.index] if self.spec.params.n == 1 else range(self.spec.params.n)
        for i in indices:
            if i not in self.finished_indices:
                self.queue.put_nowait(error_delta(self.leg_id, i, message))
        self.done = True


def journal_start(store, leg: Leg) -> None:
    """The store's journal says where the leg runs (so a request on a dead instance can be found)."""
    from cluster.store.base import JournalEntry, JournalState

    try:
        store.journal_start(leg.leg_id, JournalEntry(leg.leg_id, leg.spec.prompt_token_ids, {"n": 1},
                                                     leg.prefill_id, leg.decode_id, JournalState.PREFILLING))
    except ValueError:
        pass


def journal_finish(store, leg: Leg) -> None:
    try:
        store.journal_finish(leg.leg_id)
    except Exception:  # the store may be unreachable: the entry expires
        pass
