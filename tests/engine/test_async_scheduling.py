"""Async scheduling: step N+1 is launched before step N's tokens are read back, and nothing a
client sees changes.

The outside reference is the synchronous engine (itself checked token for token against
transformers in test_parity.py): the same workload through both must give the same tokens,
text, finish reasons and logprobs. The workload is built to hit every path where a token
read back late matters: sequences that stop on a token, a stop string or a length while
the next step already computes for them (that token must be dropped), min_tokens,
seeded sampling with n > 1, logprobs, penalties (they count the pending token on the device), chunked
prefill, prefix-cache hits and preemption in a pool too small for the batch.
"""
from __future__ import annotations

import random
from dataclasses import replace

import pytest

from cluster.config import CacheConfig, EngineConfig, ModelConfig, RunnerConfig, SchedulerConfig
from cluster.engine.engine import Engine
from cluster.models.tokenizer import Tokenizer
from cluster.types import SamplingParams


MAX_LEN = 112


def _engine(model_dir: str, async_scheduling: bool, num_blocks: int = 400, budget: int = 8192, device: str = "cpu",
            **parallel) -> Engine:
    from cluster.config import ParallelConfig

    cfg = EngineConfig(model=ModelConfig(path=model_dir, dtype="float32", max_model_len=MAX_LEN),
                       cache=CacheConfig(num_blocks=num_blocks),
                       scheduler=SchedulerConfig(max_num_batched_tokens=budget),
                       runner=RunnerConfig(device=device, async_scheduling=async_scheduling),
                       parallel=ParallelConfig(**parallel))
    return Engine(cfg, tokenizer=Tokenizer.from_dir(model_dir), progress=False)


def _run(engine: Engine, requests: list[tuple[str, list[int], SamplingParams]], late_at: int = 6) -> dict:
    """Every delta field a client sees, per (request, completion); the last two requests arrive at step `late_at`."""
    out: dict = {}
    for rid, prompt, params in requests[:-2]:
        engine.add_request(rid, prompt, params)
    steps = 0
    while engine.has_unfinished() or steps <= late_at:
        if steps == late_at:
            for rid, prompt, params in requests[-2:]:
                engine.add_request(rid, prompt, params)
        for d in engine.step():
            rec = out.setdefault((d.request_id, d.index), {"ids": [], "text": "", "logprobs": [], "end": None})
            rec["ids"] += d.token_ids
            rec["text"] += d.text
            if d.logprobs:
                rec["logprobs"] += [(lp.token_id, round(lp.logprob, 4), sorted(lp.top)) for lp in d.logprobs]
            if d.finish_reason is not None:
                assert rec["end"] is None, f"{d.request_id} finished twice"
                rec["end"] = (d.finish_reason, d.stop_reason)
        steps += 1
        assert steps < 5000
    assert not engine.requests and engine.in_flight is None
    assert engine.kv.num_free_blocks == engine.kv.num_blocks, "KV blocks leaked"
    return out


def _workload(model_dir: str) -> list[tuple[str, list[int], SamplingParams]]:
    """Stops are picked from a synchronous greedy run, so they fall in the middle of generations."""
    rng = random.Random(3)
    prompts = [[rng.randrange(10, 900) for _ in range(n)] for n in (3, 9, 17, 40, 70, 80, 5, 33)]
    shared = prompts[5][:64]
    prompts += [shared + [rng.randrange(10, 900) for _ in range(7)], shared + [rng.randrange(10, 900) for _ in range(2)]]
    probe = _engine(model_dir, async_scheduling=False)
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    base = _run(probe, [(str(i), p, greedy) for i, p in enumerate(prompts)])
    ids = {i: base[(str(i), 0)]["ids"] for i in range(len(prompts))}
    texts = {i: base[(str(i), 0)]["text"] for i in range(len(prompts))}
    stop_text = texts[1][len(texts[1]) // 2 : len(texts[1]) // 2 + 3]
    params = [
        replace(greedy, stop_token_ids=(ids[0][7],)),  # stops on a token mid-generation
        replace(greedy, stop=(stop_text,)) if stop_text.strip() else greedy,  # a stop string mid-text
        replace(greedy, max_tokens=1),  # ends with its first token
        replace(greedy, max_tokens=2, logprobs=3),
        SamplingParams(temperature=0.8, top_k=40, top_p=0.9, seed=11, n=2, max_tokens=20, ignore_eos=True),
        replace(greedy, stop_token_ids=(ids[5][3],), min_tokens=6),  # the stop token is masked at first
        replace(greedy, repetition_penalty=1.3, frequency_penalty=0.2),  # these steps wait for the tokens
        SamplingParams(temperature=1.0, seed=5, max_tokens=17, logprobs=0, ignore_eos=True),
        replace(greedy, stop_token_ids=(ids[8][10],)),  # late arrival, prefix-cache hit
        replace(greedy, max_tokens=None),  # runs into the context limit (max_model_len)
    ]
    return [(str(i), p, params[i]) for i, p in enumerate(prompts)]


@pytest.mark.parametrize("pool", ["roomy", "preempting", "chunked"])
def test_async_scheduling_gives_what_the_synchronous_engine_gives(checkpoint_dir, pool):
    model_dir = checkpoint_dir("qwen2")
    requests = _workload(model_dir)
    sizes = {"roomy": {}, "preempting": {"num_blocks": 12}, "chunked": {"budget": 24}}[pool]
    expected = _run(_engine(model_dir, async_scheduling=False, **sizes), requests)
    engine = _engine(model_dir, async_scheduling=True, **sizes)
    got = _run(engine, requests)
    assert got == expected
    assert expected[("0", 0)]["end"][0].value == "stop" and len(expected[("0", 0)]["ids"]) < 24
    assert len(expected[("9", 0)]["ids"]) == MAX_LEN - len(requests[9][1])  # up to the context limit
    if pool == "preempting":
        assert engine.scheduler.num_preemptions > 0


def test_the_next_step_is_launched_before_the_last_ones_tokens_are_read(checkpoint_dir):
    """The point of async scheduling: the host plans and launches step N+1 while step N runs, and
    reads N's tokens only then. Recorded on the real engine: every read comes after the next launch."""
    model_dir = checkpoint_dir("qwen2")
    engine = _engine(model_dir, async_scheduling=True)
    events: list[str] = []
    launch = engine.executor.launch

    def recording_launch(sched):
        pending = launch(sched)
        events.append(f"launch{len([e for e in events if e.startswith('launch')])}")
        result = pending.result

        def recording_result(number=events[-1][6:]):
            events.append(f"read{number}")
            return result()

        pending.result = recording_result
        return pending

    engine.executor.launch = recording_launch
    engine.add_request("r", list(range(20, 40)), SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    tokens = []
    while engine.has_unfinished():
        tokens += [t for d in engine.step() for t in d.token_ids]
    assert len(tokens) == 6
    # six launches (one per token), each read once, always after the following launch
    assert events == ["launch0", "launch1", "read0", "launch2", "read1", "launch3", "read2", "launch4", "read3",
                      "launch5", "read4", "read5"]


def test_an_abort_while_its_step_is_in_flight_drops_its_token_and_frees_its_blocks(checkpoint_dir):
    model_dir = checkpoint_dir("qwen2")
    engine = _engine(model_dir, async_scheduling=True)
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    engine.add_request("keep", list(range(50, 80)), params)
    engine.add_request("drop", list(range(90, 140)), params)
    got: dict[str, list[int]] = {"keep": [], "drop": []}
    for _ in range(5):
        for d in engine.step():
            got[d.request_id] += d.token_ids
    assert engine.in_flight is not None
    engine.abort("drop")
    while engine.has_unfinished():
        for d in engine.step():
            got[d.request_id] += d.token_ids
    assert len(got["keep"]) == 30 and len(got["drop"]) == 4  # the in-flight token of "drop" never comes out
    assert engine.kv.num_free_blocks == engine.kv.num_blocks
    reference = _engine(model_dir, async_scheduling=False)
    reference.add_request("keep", list(range(50, 80)), params)
    expected = []
    while reference.has_unfinished():
        expected += [t for d in reference.step() for t in d.token_ids]
    assert got["keep"] == expected


@pytest.mark.slow
def test_a_tp2_instance_fills_placeholders_on_every_rank(checkpoint_dir):
    """TP=2 (two processes, gloo): the driver broadcasts each launched step's tokens to the other
    rank, whose embedding reads them in place of the placeholders. Same outputs as one process, synchronous."""
    model_dir = checkpoint_dir("llama")
    requests = _workload(model_dir)
    expected = _run(_engine(model_dir, async_scheduling=False, budget=24), requests)
    engine = _engine(model_dir, async_scheduling=True, budget=24, tensor_parallel_size=2)
    try:
        assert _run(engine, requests) == expected
    finally:
        engine.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("pool", ["roomy", "preempting"])
def test_pp2_keeps_two_batches_in_the_stages_and_gives_the_same_outputs(checkpoint_dir, pool):
    """PP=2 (two processes, gloo): the running sequences take turns in two batches, and the next
    batch's layers are launched before the previous batch's rows are waited for, so stage 0 is not
    idle while stage 1 works. Outputs (stops, seeds, min_tokens, logprobs, penalties) are the
    synchronous single-process engine's."""
    model_dir = checkpoint_dir("qwen2")
    requests = _workload(model_dir)
    sizes = {"roomy": {}, "preempting": {"num_blocks": 12}}[pool]  # preempting: sequences in the stages too
    expected = _run(_engine(model_dir, async_scheduling=False, **sizes), requests)
    engine = _engine(model_dir, async_scheduling=True, pipeline_parallel_size=2, **sizes)
    events: list[tuple[str, int]] = []  # (what, sequences launched)
    launch_forward, finish = engine.executor.launch_forward, engine.executor.finish

    def recording_launch_forward(sched):
        events.append(("launch", len(sched.scheduled)))
        return launch_forward(sched)

    def recording_finish(forward):
        events.append(("finish", 0))
        return finish(forward)

    engine.executor.launch_forward, engine.executor.finish = recording_launch_forward, recording_finish
    try:
        assert _run(engine, requests) == expected
        assert pool == "roomy" or engine.scheduler.num_preemptions > 0
    finally:
        engine.shutdown()
    # launches made while another launched step was not finished: two steps (of disjoint batches: a
    # sequence in a step not finished yet is not scheduled) were in the stages at once, over and over
    outstanding, overlapped = 0, 0
    for kind, _ in events:
        overlapped += kind == "launch" and outstanding >= 1
        outstanding += 1 if kind == "launch" else -1
    assert overlapped >= 10, [kind for kind, _ in events]
