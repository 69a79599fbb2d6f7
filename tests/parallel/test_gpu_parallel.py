"""The same instances on GPUs (NCCL, Triton attention, CUDA graphs for TP decode): run with `make test-gpu`.

Float32 so that tokens can be compared exactly with the single-GPU engine; the bf16
grouped GEMM is checked against the expert loop on its own.
"""
from __future__ import annotations

import pytest
import torch

from tests.parallel.test_instance import CASES, _assert_same, _engine, _prompts, _run

pytestmark = pytest.mark.gpu


two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2,
                              reason="GPU TESTS NOT RUN: need 2 CUDA devices; run `make test-gpu` on a 2-GPU machine")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU TESTS NOT RUN: no CUDA device")
def test_grouped_gemm_bf16_matches_the_loop():  # one GPU is enough (a one-GPU session skipped it with the rest)
    from cluster.parallel.experts import expert_counts, expert_mlp, grouped_mm_available

    rows = torch.randn(300, 256, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, 8, (300,), device="cuda")
    counts = expert_counts(ids, 8)
    rows = rows[torch.argsort(ids, stable=True)]
    w13 = torch.randn(8, 2 * 128, 256, device="cuda", dtype=torch.bfloat16) / 16
    w2 = torch.randn(8, 256, 128, device="cuda", dtype=torch.bfloat16) / 11
    if not grouped_mm_available(rows):
        pytest.skip("torch._grouped_mm needs compute capability 9.0+")
    grouped = expert_mlp(rows, counts, w13, w2, grouped=True).float()
    loop = expert_mlp(rows, counts, w13, w2, grouped=False).float()
    assert torch.allclose(grouped, loop, atol=2e-2, rtol=2e-2)


@two_gpus
@pytest.mark.parametrize("case", ["tp2", "pp2", "ep2"])
def test_gpu_instance_matches_one_gpu(checkpoint_dir, case):
    name, sizes, flipped = CASES[case]
    model_dir = checkpoint_dir(name)
    prompts = _prompts(model_dir)
    single = _engine(model_dir, device="cuda")
    expected = _run(single, prompts, "ref")
    del single
    engine = _engine(model_dir, device="cuda", **sizes)
    try:
        if case == "tp2":
            assert engine.runner.graphs is not None
            stats = engine.executor.stats()
            # the TP all-reduces go through the one-shot peer-memory kernel (checked against NCCL at start)
            assert stats["one_shot_all_reduce"], stats["one_shot_error"]
        _assert_same(_run(engine, prompts, "off"), expected)
        engine.executor.set_flags(**flipped)
        _assert_same(_run(engine, prompts, "on"), expected)
    finally:
        engine.shutdown()


@two_gpus
def test_a_second_tp_instance_in_one_process_stays_on_nccl_at_once(checkpoint_dir):
    """torch numbers symmetric-memory rendezvous per process: the driver of a second TP=2 instance in
    one process is ahead of its fresh worker ranks, whose keys would never match. The ranks see it
    before they start (one_shot_error says why) and stay on NCCL, instead of a 60 s store timeout."""
    import time

    from cluster.parallel import one_shot

    model_dir = checkpoint_dir("llama")
    prompts = _prompts(model_dir)
    fresh = one_shot.rendezvous_done == 0
    first = _engine(model_dir, device="cuda", tensor_parallel_size=2)
    try:
        assert first.executor.stats()["one_shot_all_reduce"] == fresh
        expected = _run(first, prompts, "first")
    finally:
        first.shutdown()
    t0 = time.monotonic()
    second = _engine(model_dir, device="cuda", tensor_parallel_size=2)
    try:
        assert time.monotonic() - t0 < 40
        stats = second.executor.stats()
        assert not stats["one_shot_all_reduce"] and "rendezvous" in stats["one_shot_error"]
        _assert_same(_run(second, prompts, "second"), expected)
    finally:
        second.shutdown()


def _fused_norm_instance(model_dir: str, prompts, results) -> None:
    """In a fresh process (the first TP instance there, so its one-shot all-reduce is on): a TP=2 instance
    with each all-reduce fused with the add and RMSNorm after it; its outputs with overlap off and on,
    and its stats."""
    engine = _engine(model_dir, device="cuda", **CASES["tp2-fused-norm"][1])
    try:
        results.put({"stats": engine.executor.stats(), "off": _run(engine, prompts, "off")})
        engine.executor.set_flags(**CASES["tp2-fused-norm"][2])
        results.put({"on": _run(engine, prompts, "on")})
    finally:
        engine.shutdown()


@two_gpus
def test_gpu_tp2_with_the_fused_all_reduce_norm_matches_one_gpu(checkpoint_dir):
    """The fused kernel across two GPUs (parallel/one_shot_norm.py): checked against the unfused pair at
    start on both ranks, then the instance's tokens and logprobs as one GPU's, overlap off and on."""
    import multiprocessing

    model_dir = checkpoint_dir("llama")
    prompts = _prompts(model_dir)
    single = _engine(model_dir, device="cuda")
    expected = _run(single, prompts, "ref")
    del single
    spawn = multiprocessing.get_context("spawn")
    results = spawn.Queue()
    child = spawn.Process(target=_fused_norm_instance, args=(model_dir, prompts, results))
    child.start()
    try:
        first = results.get(timeout=300)
        stats = first["stats"]
        assert stats["one_shot_all_reduce"], stats["one_shot_error"]
        assert stats["one_shot_norm"], stats["one_shot_norm_error"]
        _assert_same(first["off"], expected)
        _assert_same(results.get(timeout=300)["on"], expected)
    finally:
        child.join(120)
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0
