"""A leg: one completion of a request as the cluster moves it between pools.

A disaggregated request with `n` completions has n legs (`<request>#<i>`); a mixed-pool
request has one leg carrying all n. A leg restarted elsewhere after a failure keeps its
queue (the client's stream) and gets a new id (`~<retry>`).
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, replace

from cluster.disagg.roles import RequestSpec
from cluster.runtime.instance import error_delta
from cluster.types import TokenDelta


@dataclass
class Delivery:
    """What the cluster must do after a leg took a delta (`Leg.deliver`)."""

    finished: bool = False  # the leg's last completion ended: its journal entry goes
    confirm: bool = False  # decode produced after the KV landed: prefill may free its copy
    abort_decode: bool = False  # prefill's first token already ended the leg: decode stops


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
    origin: RequestSpec | None = None  # the spec as the client asked it (None: `spec`); retries resume from it

    def __post_init__(self) -> None:
        self.origin = self.origin or self.spec

    def renamed(self, new_id: str) -> None:
        """Go on under `new_id`: whatever the instances still send under the old id is not this leg's."""
        self.leg_id = new_id
        self.spec = replace(self.spec, request_id=new_id)

    def resume(self) -> None:
        """Start again elsewhere (a retry): the prompt is the client's prompt plus every token the client
        already has, the limits count those tokens as spent, and the id says which retry this is. From the
        origin, not the last retry's spec: that one holds the tokens before its start already, and a second
        retry built on it repeated them in the prompt and spent them twice."""
        p, emitted = self.origin.params, len(self.output_ids)
        params = replace(p, max_tokens=None if p.max_tokens is None else p.max_tokens - emitted,
                         min_tokens=max(0, p.min_tokens - emitted))
        self.retries += 1
        self.spec = RequestSpec(f"{self.leg_id.split('~')[0]}~{self.retries}", self.origin.prompt_token_ids + self.output_ids,
                                params, None)
        self.leg_id = self.spec.request_id
        self.first_token, self.held, self.expect_prefill_token, self.confirmed = None, [], True, False

    def deliver(self, delta: TokenDelta, from_prefill: bool, disaggregated: bool, completions: int,
                prefill_listed: bool) -> Delivery:
        """Take a delta from the leg's prefill or decode instance and pass on what the client should see:
          - prefill's first token waits while the leg is being placed (`reserving`: decode has not taken
            the request yet) and is dropped once decode went on without it (it recomputed);
          - decode's tokens wait (`held`) until prefill's first token has gone out, then follow it;
          - decode's first token shows the KV landed: prefill is told to free its copy (once), unless
            prefill is no longer listed (`prefill_listed`: it died, and its copy with it)."""
        out = Delivery()
        if self.done:
            return out
        if from_prefill:
            if self.reserving:
                self.early_first = delta
                return out
            if not self.expect_prefill_token or self.first_token is not None:
                return out  # decode already went on without it
            self.first_token = delta.token_ids[0] if delta.token_ids else None
            held, self.held = self.held, []
            for each in (delta, *held):
                out.finished |= self.emit(each, completions, as_index=disaggregated)
            if held and not self.confirmed:  # decode ran ahead of this delta: its KV had landed
                self.confirmed = out.confirm = True
            out.abort_decode = delta.finish_reason is not None
            return out
        if disaggregated and self.expect_prefill_token and self.first_token is None:
            self.held.append(delta)
            return out
        if disaggregated and not self.confirmed and prefill_listed:
            self.confirmed = out.confirm = True
        out.finished = self.emit(delta, completions, as_index=disaggregated)
        return out

    def emit(self, delta: TokenDelta, completions: int, as_index: bool) -> bool:
        """Pass `delta` to the client's stream (with this leg's index when `as_index`); True when that ended
        the leg's last open completion of `completions`."""
        if self.done:
            return False
        self.output_ids.extend(delta.token_ids)
        if delta.finish_reason is not None:
            self.finished_indices.add(delta.index)
            self.done = len(self.finished_indices) >= completions
        self.queue.put_nowait(replace(delta, index=self.index) if as_index else delta)
        return self.done

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
