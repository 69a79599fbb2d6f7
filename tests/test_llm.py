"""The offline `LLM` API as a user calls it: text and token prompts, sampling, stops, errors."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from cluster import LLM, SamplingParams
from cluster.types import FinishReason


@pytest.fixture(scope="module")
def llm(checkpoint_dir):
    return LLM(model=checkpoint_dir("llama"), device="cpu", progress=False)


def test_text_and_token_prompts(llm):
    ids = llm.tokenizer.encode("The capital of France")
    outs = llm.generate(["The capital of France", ids], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids
    assert len(outs[0].outputs[0].token_ids) == 12
    assert outs[0].outputs[0].finish_reason == FinishReason.LENGTH
    assert outs[0].outputs[0].text == llm.tokenizer.decode(outs[0].outputs[0].token_ids)
    assert outs[0].prompt == "The capital of France" and outs[1].prompt is None


def test_seeded_sampling_reproduces_and_n_completions(llm):
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=1234, n=3, ignore_eos=True)
    first = llm.generate("Once upon a time", params)[0]
    # the same request again, now batched with others: identical completions
    again = llm.generate(["Hello there", "Once upon a time"], [SamplingParams(max_tokens=5, temperature=1.0), params])[1]
    assert [c.token_ids for c in first.outputs] == [c.token_ids for c in again.outputs]
    assert len({tuple(c.token_ids) for c in first.outputs}) > 1, "n completions should differ"
    other = llm.generate("Once upon a time", SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=99, ignore_eos=True))[0]
    assert other.outputs[0].token_ids != first.outputs[0].token_ids


def test_stop_strings_cut_the_text(llm):
    base = llm.generate("Numbers:", SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))[0].outputs[0]
    text = base.text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert len(stop) == 3 and stop.strip(), f"output too short to test stops: {text!r}"
    cut = text.index(stop)
    out = llm.generate("Numbers:", SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, stop=[stop]))[0].outputs[0]
    assert out.text == text[:cut]
    assert out.finish_reason == FinishReason.STOP and out.stop_reason == stop
    incl = llm.generate("Numbers:", SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, stop=[stop],
                                                   include_stop_str_in_output=True))[0].outputs[0]
    assert incl.text == text[: cut + len(stop)]


def test_logprobs_top_n(llm):
    out = llm.generate("abc", SamplingParams(max_tokens=4, temperature=0.0, logprobs=3, ignore_eos=True))[0].outputs[0]
    assert len(out.logprobs) == 4
    for token, lp in zip(out.token_ids, out.logprobs):
        assert lp.token_id == token and len(lp.top) == 3
        assert max(lp.top.values()) == pytest.approx(lp.logprob)  # greedy: the sampled token is the best


def test_bad_input_is_rejected_and_changes_nothing(llm):
    with pytest.raises(ValueError, match="context"):
        llm.generate([[5] * 5000], SamplingParams(max_tokens=4))
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_k=-5), dict(max_tokens=0), dict(n=0), dict(min_p=2.0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SamplingParams(**bad)
    with pytest.raises(ValueError, match="vocabulary"):
        llm.generate([[10**9]], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], SamplingParams(max_tokens=2))
    # one bad prompt in a batch: nothing of the batch is queued
    with pytest.raises(ValueError):
        llm.generate(["fine", [5] * 5000], SamplingParams(max_tokens=2))
    assert not llm.engine.has_unfinished()
    assert llm.generate("still works", SamplingParams(max_tokens=3, ignore_eos=True))[0].outputs[0].token_ids


def test_unsupported_architecture(checkpoint_dir, tmp_path):
    bad = tmp_path / "gpt2"
    shutil.copytree(checkpoint_dir("llama"), bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported architecture.*GPT2LMHeadModel"):
        LLM(model=str(bad), device="cpu", progress=False)


def test_missing_and_truncated_weights(checkpoint_dir, tmp_path):
    from cluster.models.loader import CheckpointError

    sharded = tmp_path / "sharded"
    shutil.copytree(checkpoint_dir("llama_tied_mqa_rope3_sharded"), sharded)
    shards = sorted(p for p in os.listdir(sharded) if p.endswith(".safetensors"))
    os.remove(sharded / shards[-1])
    with pytest.raises(CheckpointError, match="missing"):
        LLM(model=str(sharded), device="cpu", progress=False)

    truncated = tmp_path / "truncated"
    shutil.copytree(checkpoint_dir("llama"), truncated)
    weights = truncated / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        LLM(model=str(truncated), device="cpu", progress=False)

    with pytest.raises(FileNotFoundError):
        LLM(model=str(tmp_path / "nowhere"), device="cpu", progress=False)
