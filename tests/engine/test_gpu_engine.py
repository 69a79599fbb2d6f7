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
