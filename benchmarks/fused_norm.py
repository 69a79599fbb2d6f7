"""The fused all-reduce + add + RMSNorm kernel on one GPU, its ranks emulated: what it costs beside the norm.

    python -m benchmarks.fused_norm [--rows 1,64,256] [--hidden 4096] [--out fused_norm.jsonl]

Two GPUs are needed for the real thing (parallel/one_shot_norm.py: peers' rows over NVLink). Here every
rank's buffers and flags are local tensors and each rank's kernel runs on its own stream, all at once, so
the flag handshake and the arithmetic run as they would, with local memory standing in for the peer's.
Per call, inside a CUDA graph of 64 calls (as a decode step of Llama-3-8B runs 64 all-reduces): the fused
kernel of two emulated ranks (both streams' calls in flight together), beside `fused_add_rms_norm` alone
(the unfused pair's second kernel; the first, the one-shot all-reduce, measured 10.8 us on 2xH200).
What this cannot show is NVLink: the peer's half of each row is read from local HBM here.
"""
from __future__ import annotations

import argparse
import json

import torch

from benchmarks.harness import graph_time_ms

CALLS = 64  # a Llama-3-8B decode step's all-reduces


class EmulatedRanks:
    """`world` ranks' symmetric halves and flag arrays on one GPU, with each half's address per rank."""

    def __init__(self, world: int, rows: int, hidden: int, dtype=torch.bfloat16):
        device = torch.device("cuda")
        self.world = world
        self.buffers = [torch.zeros(2, rows * hidden, dtype=dtype, device=device) for _ in range(world)]
        self.flags = [torch.zeros(rows * world, dtype=torch.int32, device=device) for _ in range(world)]
        self.halves = [torch.tensor([b[turn].data_ptr() for b in self.buffers], dtype=torch.int64, device=device)
                       for turn in (0, 1)]
        self.flag_pointers = torch.tensor([f.data_ptr() for f in self.flags], dtype=torch.int64, device=device)
        self.streams = [torch.cuda.Stream() for _ in range(world)]
        self.turn = 0
        for stream in self.streams:  # each stream's pool holds its outputs' memory before any rank spins (a
            with torch.cuda.stream(stream):  # cudaMalloc while another rank's kernel waits could wait for it)
                cached = [torch.empty(rows, hidden, dtype=dtype, device=device) for _ in range(4)]
            del cached
        torch.cuda.synchronize()

    def call(self, partials, residual, weight, eps: float = 1e-5, num_warps: int | None = None):
        """Every rank's kernel at once, each on its own stream; [(normed, new residual)] per rank."""
        from cluster.parallel.one_shot_norm import all_reduce_add_rms_norm

        pointers, self.turn = self.halves[self.turn], self.turn ^ 1
        main = torch.cuda.current_stream()
        outs = []
        for rank, stream in enumerate(self.streams):
            stream.wait_stream(main)
            with torch.cuda.stream(stream):
                outs.append(all_reduce_add_rms_norm(partials[rank], residual, weight, eps, pointers,
                                                    self.flag_pointers, rank, self.world, num_warps))
        for stream in self.streams:
            main.wait_stream(stream)
        return outs


def _us_per_call(fn) -> float:
    """Device microseconds of one call of `fn`, inside a CUDA graph of CALLS calls."""
    return graph_time_ms(lambda: [fn() for _ in range(CALLS)], repeats=20) * 1e3 / CALLS


def measure(rows: int, hidden: int, world: int = 2, num_warps: int | None = None) -> dict:
    from cluster.ops import fused

    gen = torch.Generator().manual_seed(0)
    partials = [torch.randn(rows, hidden, generator=gen).to("cuda", torch.bfloat16) for _ in range(world)]
    residual = torch.randn(rows, hidden, generator=gen).to("cuda", torch.bfloat16)
    weight = torch.rand(hidden, generator=gen).to("cuda", torch.bfloat16)
    ranks = EmulatedRanks(world, rows, hidden)
    return {"rows": rows, "hidden": hidden, "world": world, "message_kib": rows * hidden * 2 / 1024,
            "num_warps": num_warps or "default",
            "fused_us_per_call": _us_per_call(lambda: ranks.call(partials, residual, weight, num_warps=num_warps)),
            "add_rms_norm_alone_us_per_call": _us_per_call(
                lambda: fused.fused_add_rms_norm(partials[0], residual, weight, 1e-5))}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,64,256")
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--num-warps", default="default", help="warps per program to compare, e.g. default,4,16")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    for rows in (int(r) for r in args.rows.split(",")):
        for warps in args.num_warps.split(","):
            record = measure(rows, args.hidden, num_warps=None if warps == "default" else int(warps))
            print(json.dumps(record), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
