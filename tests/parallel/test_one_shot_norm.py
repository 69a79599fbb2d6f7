"""The fused all-reduce + residual add + RMSNorm kernel (parallel/one_shot_norm.py) on the CPU.

The Triton interpreter runs the kernel's code, rank by rank: each rank is a forked process, and the ranks'
buffers and flags are shared memory mapped at the same addresses in all of them (fork), so the kernel's
pointers reach every rank's memory as peer pointers reach it over NVLink. The flag protocol meets across
processes as across GPUs (each side writes a flag only in the state the other leaves alone, so the
interpreter's compare-and-swap, atomic or not, is enough). The ranks are forked from a fresh interpreter
each case starts, never from the test process and its threads. What this checks: the sum in rank order, the
add and the norm as `rms_norm_triton` computes them, bit for bit; flags back at zero after every call;
the halves taking turns; a rank that comes late waited for. tests/parallel/test_one_shot_norm_gpu.py runs
the compiled kernel on a GPU.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time

import pytest
import torch

if torch.cuda.is_available():
    pytest.skip("the interpreted kernel runs where there is no GPU (test_one_shot_norm_gpu.py runs it compiled)",
                allow_module_level=True)
os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported
triton = pytest.importorskip("triton")

from cluster.ops import fused_triton  # noqa: E402
from cluster.parallel import one_shot_norm  # noqa: E402

if isinstance(one_shot_norm._all_reduce_add_rms_norm_kernel, triton.runtime.jit.JITFunction):
    pytest.fail("triton was imported before TRITON_INTERPRET=1 was set and there is no GPU", pytrace=False)

EPS = 1e-5


def _ranks(world: int, rows: int, hidden: int, late_rank: int | None, calls: int, seed: int = 0):
    """Every rank's (normed, added) of its last call, and the flags after the calls; rank r > 0 runs in
    a forked process, `late_rank` starts 0.3 s after the others."""
    gen = torch.Generator().manual_seed(seed)
    partials = [torch.randn(rows, hidden, generator=gen) * (rank + 1) for rank in range(world)]
    residual, weight = torch.randn(rows, hidden, generator=gen), torch.rand(hidden, generator=gen)
    buffers = [torch.zeros(2, rows * hidden).share_memory_() for _ in range(world)]
    flags = [torch.zeros(rows * world, dtype=torch.int32).share_memory_() for _ in range(world)]
    outs = [torch.zeros(2, rows, hidden).share_memory_() for _ in range(world)]
    flag_pointers = torch.tensor([f.data_ptr() for f in flags], dtype=torch.int64)
    halves = [torch.tensor([b[turn].data_ptr() for b in buffers], dtype=torch.int64) for turn in (0, 1)]

    def run(rank: int) -> None:
        if rank == late_rank:
            time.sleep(0.3)
        for call in range(calls):
            normed, added = one_shot_norm.all_reduce_add_rms_norm(partials[rank], residual, weight, EPS,
                                                                  halves[call % 2], flag_pointers, rank, world)
        outs[rank][0].copy_(normed)
        outs[rank][1].copy_(added)

    fork = multiprocessing.get_context("fork")
    procs = [fork.Process(target=run, args=(rank,), daemon=True) for rank in range(1, world)]
    for proc in procs:
        proc.start()
    run(0)
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0, f"rank process exit code {proc.exitcode}"
    expected = fused_triton.rms_norm_triton(sum(partials[1:], partials[0]), weight, EPS, residual=residual)
    return outs, expected, flags


def _compare(world: int, late_rank: int | None) -> dict:
    """Run the ranks and say, per rank, whether its outputs are the unfused kernel's, and what the flags hold."""
    outs, (normed, added), flags = _ranks(world, rows=6, hidden=64, late_rank=late_rank, calls=3)
    return {"added": [torch.equal(outs[rank][1], added) for rank in range(world)],
            "normed": [torch.equal(outs[rank][0], normed) for rank in range(world)],
            "flags_set": sum(int(f.abs().sum()) for f in flags)}


@pytest.mark.parametrize("world, late_rank", [(1, None), (2, None), (2, 0), (2, 1), (4, 3)])
def test_every_rank_gets_the_unfused_result_and_the_flags_reset(world, late_rank):
    """The ranks are forked from a fresh, single-threaded interpreter (`python -m` this module), never
    from the test process: forked from a process whose threads (an earlier test's engines, torch's
    OpenMP pool) held a lock, a rank hung for minutes in a full CPU run. A hang fails at the timeout."""
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        done = subprocess.run([sys.executable, "-m", "tests.parallel.test_one_shot_norm", str(world), str(late_rank)],
                              cwd=root, env=env, capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the ranks did not finish in 180 s: the flag protocol deadlocked\n{exc.stderr}")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["added"] == [True] * world, result
    assert result["normed"] == [True] * world, result
    assert result["flags_set"] == 0, "a flag left set"


if __name__ == "__main__":  # one case, its ranks forked from this fresh process (the test above runs it)
    torch.set_num_threads(1)
    world_arg, late_arg = sys.argv[1:3]
    print(json.dumps(_compare(int(world_arg), None if late_arg == "None" else int(late_arg))))
