"""A prefill instance of two GPUs (NCCL) streams its KV groups while the step computes: run with `make test-gpu`.

Float32, so that the disaggregated tokens can be compared exactly with one GPU's engine. The decode
engine is one GPU's, in this process, over the loopback transport: what is checked is the prefill
side's gathers inside its forward, on NCCL (the CPU tests run the same path on gloo).
"""
from __future__ import annotations

import random

import pytest
import torch

from cluster.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, RunnerConfig
from cluster.engine.engine import Engine
from cluster.types import Role
from tests.disagg.test_workers import PARAMS, _pair, _serve, run_to_end

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason=(
    "GPU TESTS NOT RUN: need 2 CUDA devices; run `make test-gpu` on a 2-GPU machine"))]


def _engine(model_dir: str, role: Role, tp: int = 1) -> Engine:
    cfg = EngineConfig(model=ModelConfig(path=model_dir, dtype="float32"), runner=RunnerConfig(device="cuda"),
                       cache=CacheConfig(num_blocks=200), parallel=ParallelConfig(tensor_parallel_size=tp))
    return Engine(cfg, role=role, progress=False)


@pytest.mark.parametrize("group_bytes", [None, 1])
def test_tp2_prefill_streams_kv_over_nccl_to_a_one_gpu_decode(checkpoint_dir, monkeypatch, group_bytes):
    import cluster.disagg.prefill as prefill_module

    if group_bytes is not None:  # one layer a message: a gather inside every layer's hook
        monkeypatch.setattr(prefill_module, "GROUP_BYTES", group_bytes)
    model_dir = checkpoint_dir("qwen2")
    rng = random.Random(3)
    prompts = [[rng.randrange(900) for _ in range(n)] for n in (5, 40, 130)]
    single = _engine(model_dir, Role.MIXED)
    expected = run_to_end(single, prompts, PARAMS)
    single.shutdown()
    prefill_engine = _engine(model_dir, Role.PREFILL, tp=2)
    try:
        prefill, decode = _pair(model_dir, prefill_engine=prefill_engine, decode_engine=_engine(model_dir, Role.DECODE))
        assert _serve(prefill, decode, prompts) == expected
        assert prefill.bytes_sent > 0
    finally:
        prefill_engine.shutdown()
