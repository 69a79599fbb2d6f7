"""The fused all-reduce + residual add + RMSNorm kernel (parallel/one_shot_norm.py) against the unfused pair.

Real TP ranks need two GPUs; here the ranks are emulated on one: each rank's buffers and flags are plain
device tensors, every rank's kernel runs on a stream of its own at the same time, and they meet through
the same flag protocol they use across NVLink (the peers' addresses are simply local). What this checks
is the protocol and the arithmetic: bit for bit the sum in rank order, rounded, then `fused_add_rms_norm`;
the flags back at zero after every call; halves that alternate; and replays of a CUDA graph.
"""
from __future__ import annotations

import os
import time

import pytest
import torch

if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("GPU TESTS NOT RUN: need CUDA and compiled (not interpreted) triton; "
                "run `pytest -m gpu` on the GPU machine", allow_module_level=True)

from benchmarks.fused_norm import EmulatedRanks  # noqa: E402

pytestmark = pytest.mark.gpu

EPS = 1e-5


def _wait(timeout_s: float = 20.0) -> None:
    """The device's queued work done, or a failure (not a hang) if the ranks never met."""
    done = torch.cuda.Event()
    done.record()
    deadline = time.monotonic() + timeout_s
    while not done.query():
        assert time.monotonic() < deadline, "the emulated ranks' kernels did not finish: the flag protocol deadlocked"
        time.sleep(0.001)


def _unfused(partials, residual, weight):
    from cluster.ops import fused

    total = torch.zeros(partials[0].shape, dtype=torch.float32, device=partials[0].device)
    for partial in partials:  # rank order, in fp32, rounded once: what the one-shot all-reduce returns
        total += partial.float()
    return fused.fused_add_rms_norm(total.to(partials[0].dtype), residual, weight, EPS)


def _inputs(world, rows, hidden, seed):
    gen = torch.Generator().manual_seed(seed)
    partials = [(torch.randn(rows, hidden, generator=gen) * (rank + 1)).to("cuda", torch.bfloat16) for rank in range(world)]
    residual = torch.randn(rows, hidden, generator=gen).to("cuda", torch.bfloat16)
    weight = torch.rand(hidden, generator=gen).to("cuda", torch.bfloat16)
    return partials, residual, weight


@pytest.mark.parametrize("world, rows, hidden", [(2, 1, 4096), (2, 7, 4096), (2, 64, 4096), (2, 33, 5120), (4, 16, 2048)])
def test_fused_kernel_gives_the_unfused_pair_bit_for_bit(world, rows, hidden):
    ranks = EmulatedRanks(world, rows, hidden)
    for call in range(4):  # both halves, twice: the flags must be back at zero after every call
        partials, residual, weight = _inputs(world, rows, hidden, seed=call)
        outs = ranks.call(partials, residual, weight)
        _wait()
        normed, added = _unfused(partials, residual, weight)
        for rank, (got_normed, got_added) in enumerate(outs):
            assert torch.equal(got_added, added), (call, rank)
            assert torch.equal(got_normed, normed), (call, rank)
        assert all(int(f.abs().sum()) == 0 for f in ranks.flags), "a flag left set"


def test_fused_kernel_replays_in_a_cuda_graph():
    """Captured once (two calls a replay: both halves), replayed on new inputs: the flags reset themselves."""
    world, rows, hidden = 2, 64, 4096
    ranks = EmulatedRanks(world, rows, hidden)
    partials, residual, weight = _inputs(world, rows, hidden, seed=0)
    ranks.call(partials, residual, weight)  # compiled before capture
    _wait()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        first = ranks.call(partials, residual, weight)
        second = ranks.call([p * 2 for p in partials], first[0][1], weight)
    for replay in range(3):
        fresh, fresh_residual, _ = _inputs(world, rows, hidden, seed=10 + replay)
        for rank in range(world):
            partials[rank].copy_(fresh[rank])
        residual.copy_(fresh_residual)
        graph.replay()
        _wait()
        normed, added = _unfused(partials, residual, weight)
        normed2, added2 = _unfused([p * 2 for p in partials], added, weight)
        for rank in range(world):
            assert torch.equal(first[rank][0], normed) and torch.equal(first[rank][1], added)
            assert torch.equal(second[rank][0], normed2) and torch.equal(second[rank][1], added2)
        assert all(int(f.abs().sum()) == 0 for f in ranks.flags)
