"""Step plans: micro-batch cuts (inside a sequence's chunk too) and the broadcast wire form."""
from __future__ import annotations

import numpy as np
import torch

from cluster.engine.step_plan import Command, StepPlan, pack, payload_size, split, unpack


def _plan() -> StepPlan:
    # s0: prefill chunk of 5 (positions 3..7), s1: decode at position 9, s2: a new prompt of 6 that samples
    return StepPlan(
        input_ids=[10, 11, 12, 13, 14, 20, 30, 31, 32, 33, 34, 35],
        positions=[3, 4, 5, 6, 7, 9, 0, 1, 2, 3, 4, 5],
        slot_mapping=[3, 4, 5, 6, 7, 25, 32, 33, 34, 35, 36, 37],
        query_start_loc=[0, 5, 6, 12],
        seq_lens=[8, 10, 6],
        block_tables=np.array([[0, 1], [3, 0], [4, 5]], dtype=np.int32),
        logits_indices=[5, 11],  # s0 does not sample (its prompt goes on next step)
    )


def test_split_cuts_inside_a_chunk_and_keeps_causality():
    plan = _plan()
    first, second = split(plan, 2)  # cut at token 6: s0 + s1 | s2
    assert first.input_ids + second.input_ids == plan.input_ids
    assert first.query_start_loc == [0, 5, 6] and first.seq_lens == [8, 10] and first.logits_indices == [5]
    assert second.query_start_loc == [0, 6] and second.seq_lens == [6] and second.logits_indices == [5]
    a, b, c = split(plan, 3)  # cuts at 4 and 8: s0[0:4] | s0[4:5] s1 s2[0:2] | s2[2:6]
    assert a.seq_lens == [7] and a.query_start_loc == [0, 4] and a.logits_indices == []
    # s0 continues at position 7 with a context of 8; s2's first 2 tokens (context 2) do not sample
    assert b.seq_lens == [8, 10, 2] and b.query_start_loc == [0, 1, 2, 4] and b.logits_indices == [1]
    assert c.seq_lens == [6] and c.query_start_loc == [0, 4] and c.logits_indices == [3]
    assert len(b.block_tables) == 3 and b.positions == [7, 9, 0, 1]
    assert [len(p.input_ids) for p in split(plan, 100)] == [1] * 12  # never an empty micro-batch


def test_pack_round_trip():
    plan = _plan()
    header, payload = pack(plan, Command.STEP, flags=5, num_microbatches=3)
    assert header.tolist()[:2] == [Command.STEP, 5] and int(header[6]) == 3
    assert payload_size(header) == payload.numel()
    back = unpack(header, torch.from_numpy(payload.numpy().copy()))
    for name in ("input_ids", "positions", "slot_mapping", "query_start_loc", "seq_lens", "logits_indices"):
        assert getattr(back, name) == getattr(plan, name), name
    assert np.array_equal(back.block_tables, plan.block_tables) and back.streams == []
    plan.streams = [(2, 1, 4), (0, 2, 1)]  # rows whose prompt KV leaves in this step
    header, payload = pack(plan, Command.STEP)
    assert int(header[7]) == 2 and payload_size(header) == payload.numel()
    back = unpack(header, torch.from_numpy(payload.numpy().copy()))
    assert back.streams == [(2, 1, 4), (0, 2, 1)] and back.logits_indices == plan.logits_indices
    header, payload = pack(None, Command.SHUTDOWN)
    assert payload is None and payload_size(header) == 0
