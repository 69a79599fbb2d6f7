"""The decode GEMMs of the Llama-3-8B shape on one GPU, whole and as one TP=2 rank's share, several ways.

    python -m benchmarks.gemm [--batches 1,64,256] [--out gemm.jsonl]

Decode GEMMs read their weight once per step and little else, so each one's time is set against the
HBM bandwidth its weight alone needs. The eighth session's profile (`benchmarks.parallel --parts shard`) put
a TP=2 rank's QKV and O projections at 58% of that at batch 64 and the full model's at 67-71%. Each
projection runs 32 times in a CUDA graph, each time with a weight of its own (no weight stays in L2),
as the decoder's layers do, in these ways:
  linear            F.linear (cuBLAS's choice; what the engine runs)
  cublaslt          F.linear with torch's preferred BLAS library set to cuBLASLt
  weight_k_major    x @ W^T with W^T stored contiguous [in, out] (the other operand layout)
"""
from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from benchmarks.harness import graph_time_ms

LAYERS = 32
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE = 4096, 32, 8, 128, 14336


def projections(tp: int) -> dict[str, tuple[int, int]]:
    """(in, out) features of each decode projection on one rank of `tp`."""
    qkv = (HEADS + 2 * KV_HEADS) * HEAD_DIM
    return {"qkv": (HIDDEN, qkv // tp), "o": (HEADS * HEAD_DIM // tp, HIDDEN),
            "gate_up": (HIDDEN, 2 * INTERMEDIATE // tp), "down": (INTERMEDIATE // tp, HIDDEN)}


def measure(tp: int, name: str, shape: tuple[int, int], batch: int, hbm_gb_s: float | None) -> list[dict]:
    fan_in, fan_out = shape
    dtype, device = torch.bfloat16, torch.device("cuda")
    weights = [torch.randn(fan_out, fan_in, dtype=dtype, device=device) * 0.02 for _ in range(LAYERS)]
    k_major = [w.t().contiguous() for w in weights]
    x = torch.randn(batch, fan_in, dtype=dtype, device=device)
    ways = {"linear": lambda: [F.linear(x, w) for w in weights],
            "weight_k_major": lambda: [x @ w for w in k_major]}
    rows = []
    for way, fn in ways.items():
        rows.append((way, graph_time_ms(fn, repeats=10) * 1e3 / LAYERS))
    previous = torch.backends.cuda.preferred_blas_library()
    try:
        torch.backends.cuda.preferred_blas_library("cublaslt")
        rows.append(("cublaslt", graph_time_ms(lambda: [F.linear(x, w) for w in weights], repeats=10) * 1e3 / LAYERS))
    finally:
        torch.backends.cuda.preferred_blas_library(previous)
    weight_bytes = fan_in * fan_out * 2
    out = []
    for way, us in rows:
        record = {"tp": tp, "projection": name, "batch": batch, "in": fan_in, "out": fan_out, "way": way,
                  "us": us, "weight_mib": weight_bytes / 2**20, "gb_s": weight_bytes / us / 1e3}
        if hbm_gb_s:
            record["share_of_hbm"] = record["gb_s"] / hbm_gb_s
        out.append(record)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--hbm-gb-s", type=float, default=None, help="the HBM bandwidth measured in the same session")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    for tp in (1, 2):
        for name, shape in projections(tp).items():
            for batch in (int(b) for b in args.batches.split(",")):
                for record in measure(tp, name, shape, batch, args.hbm_gb_s):
                    print(json.dumps(record), flush=True)
                    if args.out:
                        with open(args.out, "a") as f:
                            f.write(json.dumps(record) + "\n")
                torch.cuda.empty_cache()  # the weights of one shape go before the next's are made


if __name__ == "__main__":
    main()
