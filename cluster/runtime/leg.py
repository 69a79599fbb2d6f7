"""A leg: one completion of a request as the cluster moves it between pools, as a state machine.

A disaggregated request with `n` completions has n legs (`<request>#<i>`); a mixed-pool
request has one leg carrying all n. A leg restarted elsewhere after a failure keeps its
queue (the client's stream) and gets a new id (`~<retry>`).

    PLACING ──placed──▶ PREFILLING ──prefill's first token──▶ TRANSFERRING ──decode's token──▶ DECODING
       ▲   │                │  (mixed: the instance's first token ─────────────────────────────▶ DECODING)
       │   │                └──────── transfer failed ──┐           │ transfer failed
       │   └─ placed, transfer failed while PLACING ───▶▼           ▼
       │                                            RECOMPUTING (decode computes the prompt itself)
       │                                                │ decode's first token: the client's first token,
       │                                                │ or checked against the one it already has
       │                                                ▼
       └── retry (instance died, or a recomputed first token differs) ── any live state      DECODING
    any live state ──last completion ends──▶ DONE;  ──no retry left / aborted──▶ FAILED

Tokens from prefill (its first) and from decode (the rest) meet here: decode's wait while the
client has no first token (`held`), a prefill's first token waits while the leg is PLACING
(`early_first`: decode has not taken the request yet). Only prefill's delta carries the first token
to the client (decode lands it with the KV and streams the tokens after it), so a prefill that dies
PREFILLING (`lost_prefill`) leaves a leg whose decode recomputes (its own first token is the client's)
or, if the KV had landed, runs again (a retry): its held deltas would wait for a first token that died.
"""
from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field, replace

from cluster.disagg.roles import RequestSpec
from cluster.runtime.instance import error_delta
from cluster.types import TokenDelta


class LegState(enum.Enum):
    PLACING = "placing"
    PREFILLING = "prefilling"
    TRANSFERRING = "transferring"
    RECOMPUTING = "recomputing"
    DECODING = "decoding"
    DONE = "done"
    FAILED = "failed"


LIVE = (LegState.PREFILLING, LegState.TRANSFERRING, LegState.RECOMPUTING, LegState.DECODING)


@dataclass
class Delivery:
    """What the cluster must do after a leg took a delta (`Leg.deliver`)."""

    finished: bool = False  # the leg's last completion ended: its journal entry goes
    confirm: bool = False  # decode produced after the KV landed: prefill may free its copy
    abort_decode: bool = False  # prefill's first token already ended the leg: decode stops
    restart: bool = False  # decode recomputed a first token other than the client's: run the leg again


@dataclass
class Leg:
    """One completion of a request as it moves through the pools."""

    leg_id: str
    index: int
    spec: RequestSpec
    queue: asyncio.Queue
    prefill_id: str | None = None
    decode_id: str | None = None
    state: LegState = LegState.PLACING
    first_token: int | None = None  # the first token the client has (None: none yet)
    output_ids: list[int] = field(default_factory=list)
    held: list[TokenDelta] = field(default_factory=list)  # decode deltas that arrived before the first token
    retries: int = 0
    finished_indices: set = field(default_factory=set)  # completions of this leg that have ended
    early_first: TokenDelta | None = None  # prefill's first token, held while PLACING
    origin: RequestSpec | None = None  # the spec as the client asked it (None: `spec`); retries resume from it
    prefill_lost: bool = False  # the prefill instance died before the client had its first token
    recompute_early: bool = False  # decode gave up on the transfer while the leg was still PLACING

    def __post_init__(self) -> None:
        self.origin = self.origin or self.spec

    @property
    def done(self) -> bool:
        return self.state in (LegState.DONE, LegState.FAILED)

    def renamed(self, new_id: str) -> None:
        """Go on under `new_id`: whatever the instances still send under the old id is not this leg's."""
        self.leg_id = new_id
        self.spec = replace(self.spec, request_id=new_id)
        self.held, self.recompute_early = [], False  # the old placement's: not this one's

    def placed(self, prefill_id: str, decode_id: str) -> list[TokenDelta]:
        """PLACING -> PREFILLING: the instances have taken it. RECOMPUTING instead if decode already gave
        up on the transfer (it said so while the leg was PLACING): the decode deltas held meanwhile are
        returned, to be delivered again (the first carries decode's own first token, the client's)."""
        self.prefill_id, self.decode_id = prefill_id, decode_id
        if self.state != LegState.PLACING:
            return []
        if not self.recompute_early:
            self.state = LegState.PREFILLING
            return []
        self.state, held, self.held = LegState.RECOMPUTING, self.held, []
        return held

    def recomputing(self) -> None:
        """The decode instance lost the KV transfer and computes the prompt itself (PREFILLING or
        TRANSFERRING -> RECOMPUTING; PLACING: once placed). Prefill's first token, if the client does not
        have it yet, will not be the client's: decode's own is."""
        if self.state in (LegState.PREFILLING, LegState.TRANSFERRING):
            self.state = LegState.RECOMPUTING
        elif self.state == LegState.PLACING:
            self.recompute_early = True

    def lost_prefill(self) -> bool:
        """The prefill instance died. True: the leg must run again now (PREFILLING with decode's deltas held:
        the KV landed and the first token, which only prefill's delta brings, is gone with it). Otherwise,
        while PREFILLING, decode either recomputes (its transfer fails: RECOMPUTING) or lands the KV after
        all, and then its first delta asks for the retry (`_from_decode`). TRANSFERRING (the client has the
        first token) or later: nothing to do, decode has the KV or recomputes."""
        if self.state != LegState.PREFILLING:
            return False
        self.prefill_lost = True
        return bool(self.held)

    def resume(self) -> None:
        """Start again elsewhere (a retry; any state -> PLACING): the prompt is the client's prompt plus
        every token the client already has, the limits count those tokens as spent, and the id says which
        retry this is. From the origin, not the last retry's spec: that one holds the tokens before its
        start already, and a second retry built on it repeated them in the prompt and spent them twice."""
        p, emitted = self.origin.params, len(self.output_ids)
        params = replace(p, max_tokens=None if p.max_tokens is None else p.max_tokens - emitted,
                         min_tokens=max(0, p.min_tokens - emitted))
        self.retries += 1
        self.spec = RequestSpec(f"{self.leg_id.split('~')[0]}~{self.retries}", self.origin.prompt_token_ids + self.output_ids,
                                params, None)
        self.leg_id = self.spec.request_id
        self.state, self.first_token, self.held, self.early_first = LegState.PLACING, None, [], None
        self.prefill_id = self.decode_id = None
        self.prefill_lost = self.recompute_early = False

    def deliver(self, delta: TokenDelta, from_prefill: bool, disaggregated: bool, completions: int,
                prefill_listed: bool) -> Delivery:
        """Take a delta from the leg's prefill or decode instance and pass on what the client should see.
        `prefill_listed`: the prefill instance is alive (a dead one's copy of the KV went with it)."""
        if self.done:
            return Delivery()
        if not disaggregated:  # a mixed instance does it all
            self.state = LegState.DECODING
            return Delivery(finished=self.emit(delta, completions, as_index=False))
        if from_prefill:
            return self._from_prefill(delta)
        return self._from_decode(delta, prefill_listed)

    def _from_prefill(self, delta: TokenDelta) -> Delivery:
        if self.state == LegState.PLACING:
            self.early_first = delta
            return Delivery()
        if self.state != LegState.PREFILLING:
            return Delivery()  # decode went on without it (RECOMPUTING), or it came twice
        out = Delivery()
        self.first_token = delta.token_ids[0] if delta.token_ids else None
        self.state = LegState.TRANSFERRING
        held, self.held = self.held, []
        for each in (delta, *held):
            out.finished |= self.emit(each, 1, as_index=True)
        if held:  # decode ran ahead of this delta: its KV had landed, prefill may free its copy (even when
            out.confirm = True  # decode's held tokens ended the leg: unconfirmed, the copy waited out release_timeout_s)
            if not self.done:
                self.state = LegState.DECODING
        out.abort_decode = delta.finish_reason is not None
        return out

    def _from_decode(self, delta: TokenDelta, prefill_listed: bool) -> Delivery:
        out = Delivery()
        if self.state in (LegState.PLACING, LegState.PREFILLING):
            if self.prefill_lost:  # the KV landed, but prefill's first token died with it
                out.restart = True
                return out
            self.held.append(delta)  # the client has no first token yet: prefill's comes first
            return out
        if self.state == LegState.TRANSFERRING:
            self.state = LegState.DECODING
            out.confirm = prefill_listed
        elif self.state == LegState.RECOMPUTING:
            self.state = LegState.DECODING
            if self.first_token is not None:  # the client has prefill's first token: decode's must match
                if not delta.token_ids or delta.token_ids[0] != self.first_token:
                    out.restart = True
                    return out
                if len(delta.token_ids) == 1 and delta.finish_reason is None:
                    return out  # the same token: the client has it
                delta = replace(delta, token_ids=delta.token_ids[1:], text="")
        out.finished = self.emit(delta, 1, as_index=True)
        return out

    def emit(self, delta: TokenDelta, completions: int, as_index: bool) -> bool:
        """Pass `delta` to the client's stream (with this leg's index when `as_index`); True when that ended
        the leg's last open completion of `completions`."""
        if self.done:
            return False
        self.output_ids.extend(delta.token_ids)
        if delta.finish_reason is not None:
            self.finished_indices.add(delta.index)
            if len(self.finished_indices) >= completions:
                self.state = LegState.DONE
        self.queue.put_nowait(replace(delta, index=self.index) if as_index else delta)
        return self.done

    def fail(self, message: str) -> None:
        """End every completion of this leg that has not ended, with an error the client sees."""
        indices = [self.index] if self.spec.params.n == 1 else range(self.spec.params.n)
        for i in indices:
            if i not in self.finished_indices:
                self.queue.put_nowait(error_delta(self.leg_id, i, message))
        self.state = LegState.FAILED


def journal_start(store, leg: Leg) -> None:
    """The store's journal says where the leg runs (so a request on a dead instance can be found)."""
    from cluster.store.base import JournalEntry, JournalState

    try:
        store.journal_start(leg.leg_id, JournalEntry(leg.leg_id, leg.spec.prompt_token_ids, {"n": 1},
                                                     leg.prefill_id, leg.decode_id, JournalState.PREFILLING))
    except Exception:  # noqa: BLE001 - already there, or the store is away: the router holds the leg itself
        pass


def journal_finish(store, leg: Leg) -> None:
    try:
        store.journal_finish(leg.leg_id)
    except Exception:  # the store may be unreachable: the entry expires
        pass
