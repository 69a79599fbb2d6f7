"""GPU engine (Triton attention + CUDA graphs) against transformers: run with `make test-gpu`."""
from __future__ import annotations

import random

import pytest
import torch

from tests.engine.test_parity import _hf_greedy

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _need_cuda():
    if not torch.cuda.is_available():
        pytest.skip("GPU TESTS NOT RUN: no CUDA device; run `make test-gpu` on the GPU machine")


@pytest.mark.parametrize("name", ["llama", "qwen3_moe"])
def test_cuda_graph_engine_matches_transformers(checkpoint_dir, name):
    from cluster import LLM, SamplingParams

    model_dir = checkpoint_dir(name)
    rng = random.Random(2)
    prompts = [[rng.randrange(900) for _ in range(n)] for n in (1, 7, 33, 120, 250)]
    expected = _hf_greedy(model_dir, prompts)
    llm = LLM(model=model_dir, device="cuda", dtype="float32", progress=False)
    assert (llm.engine.runner.graphs is not None) == (not llm.engine.arch.is_moe)
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=32, min_tokens=32))
    assert [o.outputs[0].token_ids for o in outs] == expected


def test_moe_decode_runs_as_cuda_graphs_with_the_grouped_gemm(checkpoint_dir):
    """bf16 on Hopper: the MoE layers' grouped GEMM never waits for the host, so decode is captured;
    the captured engine gives the eager engine's tokens and counts the same expert load."""
    from cluster import LLM, SamplingParams
    from cluster.parallel.experts import grouped_mm_runs

    if not grouped_mm_runs(torch.device("cuda"), torch.bfloat16):
        pytest.skip("GPU TESTS NOT RUN: torch._grouped_mm needs bf16 on a Hopper-class GPU")
    model_dir = checkpoint_dir("qwen3_moe")
    rng = random.Random(4)
    prompts = [[rng.randrange(900) for _ in range(n)] for n in (3, 17, 64, 130)]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    outputs, loads = [], []
    for graphs in (False, True):
        llm = LLM(model=model_dir, device="cuda", dtype="bfloat16", enable_cuda_graphs=graphs, progress=False)
        assert (llm.engine.runner.graphs is not None) == graphs
        outputs.append([o.outputs[0].token_ids for o in llm.generate(prompts, params)])
        experts = [layer.mlp.experts for layer in llm.engine.model.model.layers.values()]
        loads.append([e.tokens_per_expert.sum().item() for e in experts])
        del llm
        torch.cuda.empty_cache()
    assert outputs[0] == outputs[1]
    assert loads[0] == loads[1] and loads[0][0] > 0


def test_async_scheduling_on_cuda_gives_the_synchronous_engines_outputs(checkpoint_dir):
    """Async scheduling on the GPU path (CUDA graphs, pinned copies, events): placeholders filled on
    the device, tokens read back a step late. The workload of test_async_scheduling.py (stops while
    the next step runs, seeds, n=2, logprobs, penalties, the context limit) gives the tokens and
    finish reasons of the synchronous engine on the same GPU (float32)."""
    from tests.engine.test_async_scheduling import _engine, _run, _workload

    model_dir = checkpoint_dir("qwen2")
    requests = _workload(model_dir)

    def tokens(async_scheduling: bool) -> dict:
        engine = _engine(model_dir, async_scheduling=async_scheduling, device="cuda")
        assert engine.runner.graphs is not None
        return {key: (rec["ids"], rec["end"]) for key, rec in _run(engine, requests).items()}

    assert tokens(True) == tokens(False)
