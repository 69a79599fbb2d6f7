"""The disaggregation seam, in-process: a prefill engine hands its KV to a decode engine.

The decode engine reserves blocks before any KV moves; KV is copied layer by
layer; the tokens equal those of one mixed engine. A hand-over that never
arrives falls back to recomputing on the decode side.
"""
from __future__ import annotations

import random

import torch

from cluster.config import CacheConfig, EngineConfig, ModelConfig
from cluster.engine.engine import Engine
from cluster.types import FinishReason, Role, SamplingParams

PARAMS = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)


def _engine(model_dir, role=Role.MIXED, num_blocks=None):
    cfg = EngineConfig(model=ModelConfig(path=model_dir), cache=CacheConfig(num_blocks=num_blocks))
    return Engine(cfg, role=role, progress=False)


def _run(engine, outputs):
    while engine.has_unfinished():
        for d in engine.step():
            outputs.setdefault(d.request_id, []).extend(d.token_ids)
            if d.finish_reason is not None:
                outputs.setdefault("_finished", {})[d.request_id] = d.finish_reason


def _prompts(n=4):
    rng = random.Random(3)
    return [[rng.randrange(500) for _ in range(length)] for length in (7, 16, 45, 130)[:n]]


def test_prefill_to_decode_matches_one_engine(checkpoint_dir):
    model_dir = checkpoint_dir("qwen3")
    mixed, prefill, decode = _engine(model_dir), _engine(model_dir, Role.PREFILL), _engine(model_dir, Role.DECODE)
    expected: dict = {}
    for i, p in enumerate(_prompts()):
        mixed.add_request(str(i), p, PARAMS)
        prefill.add_request(str(i), p, PARAMS)
    _run(mixed, expected)

    firsts: dict = {}
    _run(prefill, firsts)
    assert all(r == FinishReason.PREFILLED for r in firsts["_finished"].values())
    assert prefill.kv.num_free_blocks < prefill.kv.num_blocks  # KV kept for the hand-over
    got: dict = {}
    for i in range(4):
        rid = str(i)
        handoff = prefill.export_kv(rid)
        assert handoff.first_token_id == firsts[rid][0]
        reservation = decode.reserve(rid, handoff.prompt_token_ids, PARAMS)
        assert reservation is not None
        assert [(tuple(t.shape), t.dtype) for t in handoff.layers] == reservation.message_specs()
        decode.import_kv(rid, handoff.layers, handoff.first_token_id)  # one message a layer, as a stream may be
        prefill.release(rid)
        got[rid] = [handoff.first_token_id]
    assert prefill.kv.num_free_blocks == prefill.kv.num_blocks
    _run(decode, got)
    for i in range(4):
        assert got[str(i)] == expected[str(i)]
    assert decode.kv.num_free_blocks == decode.kv.num_blocks


def test_decode_refuses_kv_it_has_no_blocks_for(checkpoint_dir):
    model_dir = checkpoint_dir("qwen3")
    decode = _engine(model_dir, Role.DECODE, num_blocks=140)  # 2048 ctx needs 128 blocks
    assert decode.reserve("big", [1] * 2000, PARAMS) is not None
    assert decode.reserve("next", [1] * 300, PARAMS) is None  # 19 blocks, 15 left: refused, nothing held
    assert "next" not in decode.requests
    assert decode.kv.num_free_blocks == 140 - 125


def test_lost_handoff_recomputes_on_decode(checkpoint_dir):
    model_dir = checkpoint_dir("qwen3")
    mixed, prefill, decode = _engine(model_dir), _engine(model_dir, Role.PREFILL), _engine(model_dir, Role.DECODE)
    prompt = _prompts(3)[2]
    expected: dict = {}
    mixed.add_request("r", prompt, PARAMS)
    _run(mixed, expected)
    firsts: dict = {}
    prefill.add_request("r", prompt, PARAMS)
    _run(prefill, firsts)
    handoff = prefill.export_kv("r")
    assert decode.reserve("r", handoff.prompt_token_ids, PARAMS) is not None
    prefill.release("r")  # the prefill side times out; no KV ever reaches the decode side
    decode.recompute("r", handoff.first_token_id)
    got = {"r": [handoff.first_token_id]}
    _run(decode, got)
    assert got["r"] == expected["r"]
    assert decode.kv.num_free_blocks == decode.kv.num_blocks


def test_layers_of_one_message_are_stacked_without_a_copy():
    """A multi-rank decode instance broadcasts the landed KV in runs of layers: a run that is one landed
    message's layers is that message (a view, no copy); layers that do not lie back to back are copied."""
    from cluster.engine.kv_handover import per_layer, stacked

    message = torch.randn(4, 2, 3, 4, 2, 8)  # [layers, K/V, blocks, block_size, heads, dim]
    layers = per_layer([message])
    run = stacked(layers[1:3])
    assert run.data_ptr() == message[1].data_ptr() and torch.equal(run, message[1:3])
    reordered = stacked([layers[2], layers[0]])  # not back to back: a copy, in the order given
    assert reordered.data_ptr() not in (message[2].data_ptr(), message[0].data_ptr())
    assert torch.equal(reordered, torch.stack([message[2], message[0]]))
    separate = [torch.randn(2, 3, 4, 2, 8) for _ in range(2)]  # two messages of one layer each
    assert torch.equal(stacked(separate), torch.stack(separate))
