"""The KV link between two engine processes: gloo on CPU, and NCCL between two GPUs (prefill on
GPU 0, decode on GPU 1; run with `make test-gpu` on a 2-GPU machine).

Several requests are prefilled in one step, so their layers stream interleaved over the link;
greedy tokens must equal one engine's. On GPUs the decode process also does device-wide waits
while its receives are posted (what hung the first 2xH200 runs).
"""
from __future__ import annotations

import multiprocessing as mp
import random
import time

import pytest
import torch

from cluster.config import CacheConfig, DisaggConfig, EngineConfig, ModelConfig, RunnerConfig
from cluster.types import Role, SamplingParams
from tests.disagg.test_workers import run_to_end

PARAMS = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


BACKENDS = [pytest.param("cpu", id="gloo"), pytest.param("cuda", id="nccl", marks=pytest.mark.gpu)]


def _engine(model_dir: str, role: Role, device: str, gpu: int):
    from cluster.engine.engine import Engine

    if device == "cuda":
        torch.cuda.set_device(gpu)
    cfg = EngineConfig(model=ModelConfig(path=model_dir, dtype="float32"), runner=RunnerConfig(device=device),
                       cache=CacheConfig(num_blocks=256, enable_prefix_caching=False))
    return Engine(cfg, role=role, progress=False)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _prefill_side(model_dir, prompts, device, address_q, go_q, done_q):
    from cluster.disagg.prefill import PrefillWorker
    from cluster.disagg.roles import RequestSpec
    from cluster.disagg.transfer.torchdist import TorchDistTransport

    engine = _engine(model_dir, Role.PREFILL, device, 0)
    transport = TorchDistTransport("P", backend="nccl" if device == "cuda" else "gloo", timeout_s=30)
    worker = PrefillWorker(engine, transport, DisaggConfig(transfer_timeout_s=120))
    transport.connect("D", address_q.get(timeout=120), is_master=False)
    assert go_q.get(timeout=120) == "reserved"
    for i, prompt in enumerate(prompts):  # all in one step: the layers of every request interleave
        worker.submit_prefill(RequestSpec(str(i), prompt, PARAMS), "D", i + 1)
    first = {}
    while len(first) < len(prompts):
        for delta in worker.step():
            first.setdefault(delta.request_id, delta.token_ids[0])
    while worker.plans:
        for request_id in list(worker.plans):
            worker.confirm(request_id)
        worker.poll()
    done_q.put(first)
    go_q.get(timeout=120)  # stay until the decode side is done


def _decode_side(model_dir, prompts, device, address_q, go_q, done_q, result_q):
    """The decode engine, in a process of its own too: on GPUs every engine process binds one GPU,
    as the cluster's instances do (the test's own process keeps GPU 0 for the reference)."""
    from cluster.disagg.decode import DecodeWorker
    from cluster.disagg.roles import RequestSpec
    from cluster.disagg.transfer.torchdist import TorchDistTransport

    engine = _engine(model_dir, Role.DECODE, device, 1)
    transport = TorchDistTransport("D", backend="nccl" if device == "cuda" else "gloo", timeout_s=30)
    decode = DecodeWorker(engine, transport, DisaggConfig(transfer_timeout_s=120))
    address_q.put(transport.listen())
    transport.connect("P", transport.listen(), is_master=True)
    for i, prompt in enumerate(prompts):
        assert decode.reserve(RequestSpec(str(i), prompt, PARAMS), "P", i + 1)
    _sync(device)  # a device-wide wait with nothing in flight yet: must not hang
    go_q.put("reserved")
    got: dict[str, list] = {}
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        for delta in decode.step():
            got.setdefault(delta.request_id, []).extend(delta.token_ids)
        _sync(device)  # while receives may be posted: must not hang either
        if not decode.pending and not engine.has_unfinished():
            break
    result_q.put((got, decode.take_events(), decode.num_recomputed))


@pytest.mark.parametrize("device", BACKENDS)
def test_kv_streams_between_two_engine_processes(checkpoint_dir, device):
    if device == "cuda" and torch.cuda.device_count() < 2:
        pytest.skip("GPU TESTS NOT RUN: need 2 CUDA devices; run `make test-gpu` on a 2-GPU machine")
    model_dir = checkpoint_dir("qwen2")
    rng = random.Random(3)
    prompts = [[rng.randrange(900) for _ in range(n)] for n in (9, 33, 70, 121)]
    expected = run_to_end(_engine(model_dir, Role.MIXED, device, 0), prompts, PARAMS)

    ctx = mp.get_context("spawn")
    address_q, go_q, done_q, result_q = ctx.Queue(), ctx.Queue(), ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=side, args=(model_dir, prompts, device, address_q, go_q, done_q, *extra), daemon=True)
             for side, extra in ((_prefill_side, ()), (_decode_side, (result_q,)))]
    for proc in procs:
        proc.start()
    try:
        got, failed, num_recomputed = result_q.get(timeout=300)
        first = done_q.get(timeout=60)
        assert not failed and num_recomputed == 0
        for request_id, tokens in expected.items():
            assert [first[request_id]] + got[request_id] == tokens, request_id
    finally:
        go_q.put("bye")
        for proc in procs:
            proc.join(timeout=30)
            if proc.exitcode is None:
                proc.kill()
