"""Scheduler driven by hand: schedule -> fake model output -> update; no block may leak."""
import random

from hypothesis import given, settings, strategies as st

from cluster.config import SchedulerConfig
from cluster.engine.kv_cache import KVCacheManager
from cluster.engine.scheduler import Scheduler
from cluster.engine.sequence import Sequence
from cluster.types import FinishReason, SamplingParams

EOS = 0


def _make(num_blocks=64, block_size=4, budget=32, max_seqs=8, chunked=True, caching=True):
    kv = KVCacheManager(num_blocks, block_size, caching)
    cfg = SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget, enable_chunked_prefill=chunked)
    return Scheduler(cfg, kv, frozenset({EOS})), kv


def _seq(rid, n_prompt, max_tokens=4, n_index=0, parent=None, prompt=None):
    prompt = prompt or [1 + (i % 50) for i in range(n_prompt)]
    return Sequence(rid, n_index, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True), 0.0, 1000, parent=parent)


def _run(sched, rng=None, max_steps=500):
    """Drive to completion with a fake model that samples random non-eos tokens."""
    rng = rng or random.Random(0)
    steps = []
    for _ in range(max_steps):
        out = sched.schedule()
        if out.is_empty:
            break
        assert out.num_tokens <= sched.config.max_num_batched_tokens
        sampled = {s.seq.seq_id: rng.randint(1, 99) for s in out.scheduled if s.samples}
        sched.update(out, sampled)
        steps.append(out)
    return steps


def _assert_no_leak(kv):
    kv.pool.check_invariants()
    assert kv.num_free_blocks == kv.num_blocks, "KV blocks leaked"


def test_chunked_prefill_respects_budget_and_decodes_go_first():
    sched, kv = _make(budget=16)
    a = _seq("a", 5, max_tokens=6)
    sched.add(a)
    sched.update(sched.schedule(), {a.seq_id: 7})  # a is now decoding
    b = _seq("b", 40)
    sched.add(b)
    out = sched.schedule()
    assert [s.seq for s in out.scheduled] == [a, b]
    assert out.scheduled[0].num_new_tokens == 1 and out.scheduled[1].num_new_tokens == 15
    assert not out.scheduled[1].samples
    sched.update(out, {a.seq_id: 8})
    _run(sched)
    assert a.num_output_tokens == 6 and b.num_output_tokens == 4
    _assert_no_leak(kv)


def test_without_chunking_a_long_prompt_waits_for_a_whole_step():
    sched, kv = _make(budget=16, chunked=False)
    sched.add(_seq("big", 20))
    assert sched.schedule().is_empty  # never fits: nothing runs, nothing leaks
    _assert_no_leak(kv)


def test_fcfs_and_max_num_seqs():
    sched, kv = _make(max_seqs=2, budget=100)
    seqs = [_seq(str(i), 3) for i in range(4)]
    for s in seqs:
        sched.add(s)
    out = sched.schedule()
    assert [s.seq for s in out.scheduled] == seqs[:2]
    _run(sched)
    assert all(s.finish_reason == FinishReason.LENGTH for s in seqs)
    _assert_no_leak(kv)


def test_preemption_by_recompute_when_blocks_run_out():
    sched, kv = _make(num_blocks=6, block_size=4, budget=64)
    a, b = _seq("a", 8, max_tokens=12), _seq("b", 8, max_tokens=12)
    sched.add(a)
    sched.add(b)
    admitted = []  # what an instance's queue-time figure reads after each step
    rng = random.Random(0)
    for _ in range(500):
        out = sched.schedule()
        if out.is_empty:
            break
        admitted.append(list(sched.admitted))
        sched.update(out, {s.seq.seq_id: rng.randint(1, 99) for s in out.scheduled if s.samples})
    assert sched.num_preemptions > 0
    assert a.num_output_tokens == 12 and b.num_output_tokens == 12
    # each request counts as admitted once, in the step that first took it off the queue: not when a
    # preempted one is taken back, and not again in the steps after
    assert admitted[0] == ["a", "b"] and all(step == [] for step in admitted[1:])
    _assert_no_leak(kv)


def test_n_siblings_share_prompt_blocks():
    sched, kv = _make(budget=64)
    parent = _seq("r", 9, max_tokens=3)
    child = _seq("r", 9, max_tokens=3, n_index=1, parent=parent)
    sched.add(parent)
    sched.add(child)
    first = sched.schedule()
    assert [s.seq for s in first.scheduled] == [parent]  # the sibling waits for the shared prompt
    sched.update(first, {parent.seq_id: 5})
    second = sched.schedule()
    assert child in [s.seq for s in second.scheduled]
    assert child.block_ids[:2] == parent.block_ids[:2]
    sched.update(second, {s.seq.seq_id: 6 for s in second.scheduled if s.samples})
    _run(sched)
    _assert_no_leak(kv)


def test_eos_and_stop_token_finish():
    sched, kv = _make()
    s = Sequence("e", 0, [1, 2, 3], SamplingParams(max_tokens=10), 0.0, 1000)
    t = Sequence("t", 0, [1, 2, 3], SamplingParams(max_tokens=10, stop_token_ids=(42,)), 0.0, 1000)
    sched.add(s)
    sched.add(t)
    out = sched.schedule()
    finished = sched.update(out, {s.seq_id: EOS, t.seq_id: 42})
    assert {f.seq_id for f in finished} == {s.seq_id, t.seq_id}
    assert t.stop_reason == 42 and s.finish_reason == FinishReason.STOP
    _assert_no_leak(kv)


@settings(max_examples=60, deadline=None)
@given(
    prompts=st.lists(st.integers(1, 40), min_size=1, max_size=10),
    max_tokens=st.integers(1, 12),
    num_blocks=st.integers(14, 40),
    budget=st.integers(8, 64),
    seed=st.integers(0, 1000),
)
def test_random_workloads_finish_without_leaks(prompts, max_tokens, num_blocks, budget, seed):
    sched, kv = _make(num_blocks=num_blocks, budget=budget, block_size=4)
    rng = random.Random(seed)
    seqs = []
    for i, n in enumerate(prompts):
        # shared prefixes exercise the prefix cache
        prompt = [7] * (n // 2) + [rng.randint(1, 9) for _ in range(n - n // 2)]
        seqs.append(_seq(str(i), n, max_tokens=max_tokens, prompt=prompt))
        sched.add(seqs[-1])
    _run(sched, rng, max_steps=5000)
    assert all(s.is_finished and s.num_output_tokens == max_tokens for s in seqs)
    _assert_no_leak(kv)
