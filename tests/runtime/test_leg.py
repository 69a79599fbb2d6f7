"""Leg: a completion's state machine as the cluster moves it (renames, retries, recomputes, its stream's end)."""
from __future__ import annotations

import asyncio

from cluster.disagg.roles import RequestSpec
from cluster.runtime.leg import Leg, LegState
from cluster.types import FinishReason, SamplingParams, TokenDelta


def _leg(n: int = 1, max_tokens: int | None = 10, min_tokens: int = 4) -> Leg:
    spec = RequestSpec("r#0", [1, 2, 3], SamplingParams(n=n, max_tokens=max_tokens, min_tokens=min_tokens))
    leg = Leg("r#0", 0, spec, asyncio.Queue())
    leg.placed("p0", "d0")
    return leg


def test_resume_continues_from_the_tokens_the_client_has():
    leg = _leg()
    leg.emit(TokenDelta("r#0", 0, [7, 8, 9], ""), completions=1, as_index=True)
    leg.first_token, leg.state = 7, LegState.RECOMPUTING
    leg.resume()
    assert leg.leg_id == leg.spec.request_id == "r#0~1" and leg.retries == 1
    assert leg.spec.prompt_token_ids == [1, 2, 3, 7, 8, 9]
    assert (leg.spec.params.max_tokens, leg.spec.params.min_tokens) == (7, 1)
    assert (leg.first_token, leg.state, leg.prefill_id, leg.decode_id) == (None, LegState.PLACING, None, None)
    leg.emit(TokenDelta("r#0~1", 0, [6], ""), completions=1, as_index=True)
    leg.resume()  # a second retry: from the client's prompt, not the first retry's (it held 7, 8, 9 already)
    assert leg.leg_id == "r#0~2" and leg.spec.prompt_token_ids == [1, 2, 3, 7, 8, 9, 6]
    assert (leg.spec.params.max_tokens, leg.spec.params.min_tokens) == (6, 0)


def test_resume_without_a_token_limit_keeps_none():
    leg = _leg(max_tokens=None, min_tokens=0)
    leg.emit(TokenDelta("r#0", 0, [5], ""), completions=1, as_index=True)
    leg.resume()
    assert leg.spec.params.max_tokens is None and leg.spec.params.min_tokens == 0


def test_renamed_drops_the_old_id_everywhere():
    leg = _leg()
    leg.renamed("r#0~r3")
    assert leg.leg_id == leg.spec.request_id == "r#0~r3"


def test_emit_ends_the_leg_when_its_last_completion_ends():
    leg = _leg(n=2)
    assert not leg.emit(TokenDelta("r", 0, [1], "", finish_reason=FinishReason.LENGTH), completions=2, as_index=False)
    assert leg.emit(TokenDelta("r", 1, [2], "", finish_reason=FinishReason.STOP), completions=2, as_index=False)
    assert not leg.emit(TokenDelta("r", 1, [3], ""), completions=2, as_index=False)  # after the end: dropped
    got = [leg.queue.get_nowait() for _ in range(leg.queue.qsize())]
    assert [d.index for d in got] == [0, 1] and leg.output_ids == [1, 2]


def test_emit_relabels_a_disaggregated_legs_index():
    leg = Leg("r#3", 3, RequestSpec("r#3", [1], SamplingParams()), asyncio.Queue())
    leg.emit(TokenDelta("r#3", 0, [4], ""), completions=1, as_index=True)
    assert leg.queue.get_nowait().index == 3


def _deliver(leg: Leg, delta: TokenDelta, from_prefill: bool, prefill_listed: bool = True):
    return leg.deliver(delta, from_prefill=from_prefill, disaggregated=True, completions=1, prefill_listed=prefill_listed)


def _stream(leg: Leg) -> list[int]:
    return [t for _ in range(leg.queue.qsize()) for t in leg.queue.get_nowait().token_ids]


def test_decode_tokens_wait_for_prefills_first_token_and_then_confirm_the_transfer():
    leg = _leg()
    assert _deliver(leg, TokenDelta("r#0", 0, [11], ""), from_prefill=False) == _deliver(
        leg, TokenDelta("r#0", 0, [12], ""), from_prefill=False)  # both held, nothing to do
    assert _stream(leg) == []
    out = _deliver(leg, TokenDelta("r#0", 0, [10], ""), from_prefill=True)
    assert out.confirm and not out.finished and not out.abort_decode
    assert _stream(leg) == [10, 11, 12] and leg.first_token == 10 and leg.state == LegState.DECODING
    assert not _deliver(leg, TokenDelta("r#0", 0, [13], ""), from_prefill=False).confirm  # confirmed once
    assert _stream(leg) == [13]


def test_decode_tokens_that_end_the_leg_before_prefills_first_token_still_confirm():
    """Decode ran ahead and its held tokens end the leg the moment prefill's first token arrives: the KV
    landed, so prefill must still be told to free its copy (unconfirmed, it held the blocks for
    release_timeout_s; CI caught a prefill still holding a transfer after every request had ended)."""
    leg = _leg(max_tokens=2, min_tokens=0)
    _deliver(leg, TokenDelta("r#0", 0, [11], "", finish_reason=FinishReason.LENGTH), from_prefill=False)
    out = _deliver(leg, TokenDelta("r#0", 0, [10], ""), from_prefill=True)
    assert out.confirm and out.finished and leg.state == LegState.DONE
    assert _stream(leg) == [10, 11]


def test_first_decode_token_after_prefills_confirms_unless_prefill_is_gone():
    leg = _leg()
    assert not _deliver(leg, TokenDelta("r#0", 0, [10], ""), from_prefill=True).confirm  # nothing held yet
    assert leg.state == LegState.TRANSFERRING
    assert _deliver(leg, TokenDelta("r#0", 0, [11], ""), from_prefill=False).confirm
    assert leg.state == LegState.DECODING
    gone = _leg()
    _deliver(gone, TokenDelta("r#0", 0, [10], ""), from_prefill=True)
    assert not _deliver(gone, TokenDelta("r#0", 0, [11], ""), from_prefill=False, prefill_listed=False).confirm


def test_prefills_token_waits_while_placing_and_is_dropped_once_decode_recomputed():
    leg = Leg("r#0", 0, RequestSpec("r#0", [1, 2, 3], SamplingParams()), asyncio.Queue())
    assert leg.state == LegState.PLACING
    first = TokenDelta("r#0", 0, [10], "")
    _deliver(leg, first, from_prefill=True)
    assert leg.early_first is first and _stream(leg) == []
    recomputed = _leg()
    recomputed.recomputing()  # the transfer failed before the client had a token: decode's first is the first
    assert recomputed.state == LegState.RECOMPUTING
    _deliver(recomputed, TokenDelta("r#0", 0, [10], ""), from_prefill=False)
    _deliver(recomputed, TokenDelta("r#0", 0, [99], ""), from_prefill=True)  # prefill's, late: dropped
    assert _stream(recomputed) == [10] and recomputed.state == LegState.DECODING


def test_a_recomputed_first_token_the_client_has_is_not_sent_twice():
    leg = _leg()
    _deliver(leg, TokenDelta("r#0", 0, [10], "a"), from_prefill=True)
    leg.recomputing()  # the transfer failed after the client got prefill's first token
    assert leg.state == LegState.RECOMPUTING
    out = _deliver(leg, TokenDelta("r#0", 0, [10], "a"), from_prefill=False)  # decode's own first token
    assert out == type(out)() and leg.state == LegState.DECODING
    _deliver(leg, TokenDelta("r#0", 0, [11], "b"), from_prefill=False)
    assert _stream(leg) == [10, 11] and leg.output_ids == [10, 11]


def test_a_recomputed_first_token_that_differs_restarts_the_leg():
    leg = _leg()
    _deliver(leg, TokenDelta("r#0", 0, [10], ""), from_prefill=True)
    leg.recomputing()
    out = _deliver(leg, TokenDelta("r#0", 0, [12], ""), from_prefill=False)
    assert out.restart and not out.finished and _stream(leg) == [10]
    leg.resume()  # what the cluster does with it: from the client's prompt and tokens
    assert leg.spec.prompt_token_ids == [1, 2, 3, 10] and leg.state == LegState.PLACING


def test_a_first_token_that_ends_the_leg_stops_decode():
    leg = _leg()
    out = _deliver(leg, TokenDelta("r#0", 0, [10], "", finish_reason=FinishReason.STOP), from_prefill=True)
    assert out.finished and out.abort_decode and leg.done and leg.state == LegState.DONE
    assert _deliver(leg, TokenDelta("r#0", 0, [11], ""), from_prefill=False) == type(out)()  # after the end: nothing


def test_a_prefill_lost_before_the_first_token_restarts_a_leg_whose_kv_had_landed():
    """Only prefill's delta brings the client its first token (decode streams the tokens after it): decode's
    deltas held when prefill dies would wait for it forever (the chaos run's prefill kill hung so)."""
    landed = _leg()
    _deliver(landed, TokenDelta("r#0", 0, [11], ""), from_prefill=False)  # held: decode had the KV
    assert landed.lost_prefill() and landed.prefill_lost
    waiting = _leg()  # no decode delta yet: decode recomputes, or lands the KV after all
    assert not waiting.lost_prefill()
    assert _deliver(waiting, TokenDelta("r#0", 0, [11], ""), from_prefill=False).restart and _stream(waiting) == []
    recomputed = _leg()
    assert not recomputed.lost_prefill()
    recomputed.recomputing()  # the transfer failed: decode's own first token is the client's
    assert not _deliver(recomputed, TokenDelta("r#0", 0, [10], ""), from_prefill=False).restart
    assert _stream(recomputed) == [10]
    has_first = _leg()
    _deliver(has_first, TokenDelta("r#0", 0, [10], ""), from_prefill=True)
    assert not has_first.lost_prefill() and not has_first.prefill_lost  # decode has the KV or recomputes
    has_first.resume()
    assert not has_first.prefill_lost


def test_a_transfer_given_up_while_placing_makes_the_placed_leg_recompute_with_decodes_held_deltas():
    leg = Leg("r#0", 0, RequestSpec("r#0", [1, 2, 3], SamplingParams()), asyncio.Queue())
    leg.recomputing()  # decode timed out on the KV before the dispatcher heard back from the prefill
    assert leg.state == LegState.PLACING
    _deliver(leg, TokenDelta("r#0", 0, [10], ""), from_prefill=False)  # decode's own first token
    replay = leg.placed("p0", "d0")
    assert leg.state == LegState.RECOMPUTING and [d.token_ids for d in replay] == [[10]] and not leg.held
    for delta in replay:
        _deliver(leg, delta, from_prefill=False)
    _deliver(leg, TokenDelta("r#0", 0, [99], ""), from_prefill=True)  # prefill's, late: dropped
    assert _stream(leg) == [10] and leg.state == LegState.DECODING
    assert _leg().placed("p1", "d1") == []  # the usual case: nothing to replay


def test_renamed_forgets_what_the_old_placement_held():
    leg = Leg("r#0", 0, RequestSpec("r#0", [1, 2, 3], SamplingParams()), asyncio.Queue())
    _deliver(leg, TokenDelta("r#0", 0, [11], ""), from_prefill=False)
    leg.recomputing()
    leg.renamed("r#0~r1")
    assert leg.held == [] and not leg.recompute_early and leg.placed("p", "d") == []
    assert leg.state == LegState.PREFILLING
