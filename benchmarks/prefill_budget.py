"""A prefill pool's step budget on one GPU: its prompt throughput and its first-token times, per budget.

    python -m benchmarks.prefill_budget --model DIR [--make-llama8b] --out prefill_budget.json

A 1P1D deployment's prefill instance is its bound under prefill-heavy load (2xH200, 2026-11-30: 39,800
prompt tokens/s at 8,192 tokens a step, 19.4 req/s of 2k prompts), and `examples/1p1d.yaml` gives
its pool 2,048 tokens a step so a prompt's first token comes after one prompt's step, not four. What
that costs in throughput is measured here, on one engine (budgets switched between runs, the biggest
allocated first):
  (1) a burst of `--burst` fresh `--prompt-len` prompts queued at once: prompt tokens/s until the last
      first token, and the median and p90 time to first token from the burst's start;
  (2) one lone prompt: its time to first token (the low-load TTFT).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import torch

from benchmarks.engine import _prompts
from cluster.config import CacheConfig, EngineConfig, ModelConfig, RunnerConfig, SchedulerConfig
from cluster.types import SamplingParams


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _first_tokens(engine, prompts: list[list[int]], tag: str) -> dict:
    """Queue `prompts` at once, step until each has its first token: seconds from the start per prompt."""
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", prompt, params)
    _sync()
    t0, firsts, steps = time.perf_counter(), {}, 0
    while engine.has_unfinished():
        for delta in engine.step():
            if delta.token_ids and delta.request_id not in firsts:
                firsts[delta.request_id] = time.perf_counter() - t0
        steps += 1
    _sync()
    return {"seconds": time.perf_counter() - t0, "firsts": sorted(firsts.values()), "steps": steps}


def _row(budget: int, burst: dict, lone: dict, prompt_len: int) -> dict:
    firsts = burst["firsts"]
    return {"budget_tokens": budget, "burst_prompts": len(firsts), "steps": burst["steps"],
            "prompt_tokens_per_s": len(firsts) * prompt_len / burst["seconds"],
            "step_ms": burst["seconds"] / max(1, burst["steps"]) * 1e3,
            "ttft_median_ms": firsts[len(firsts) // 2] * 1e3, "ttft_p90_ms": firsts[int(len(firsts) * 0.9)] * 1e3,
            "lone_ttft_ms": lone["firsts"][0] * 1e3}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--make-llama8b", action="store_true")
    ap.add_argument("--budgets", default="16384,8192,4096,2048")
    ap.add_argument("--prompt-len", type=int, default=2048)
    ap.add_argument("--burst", type=int, default=32)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a plumbing check")
    ap.add_argument("--out", default="prefill_budget.json")
    args = ap.parse_args(argv)
    if args.make_llama8b and not os.path.isdir(args.model):
        from cluster.models.make import make_llama3_8b_shape

        make_llama3_8b_shape(args.model)
    from cluster.engine.engine import Engine

    budgets = sorted((int(b) for b in args.budgets.split(",")), reverse=True)
    cfg = EngineConfig(model=ModelConfig(path=args.model, dtype="bfloat16" if args.device == "cuda" else "float32",
                                         max_model_len=args.prompt_len + 16),
                       cache=CacheConfig(gpu_memory_fraction=0.85, enable_prefix_caching=False),
                       scheduler=SchedulerConfig(max_num_seqs=256, max_num_batched_tokens=budgets[0]),
                       runner=RunnerConfig(device=args.device))
    engine = Engine(cfg, progress=False)
    vocab = engine.arch.vocab_size
    rows = []
    for k, budget in enumerate(budgets):
        engine.scheduler.config = dataclasses.replace(engine.scheduler.config, max_num_batched_tokens=budget)
        _first_tokens(engine, _prompts(4, args.prompt_len, vocab, seed=1000 + k), f"warm{budget}")  # this size's kernels
        burst = _first_tokens(engine, _prompts(args.burst, args.prompt_len, vocab, seed=k), f"b{budget}")
        lone = _first_tokens(engine, _prompts(1, args.prompt_len, vocab, seed=2000 + k), f"l{budget}")
        rows.append(_row(budget, burst, lone, args.prompt_len))
        print(json.dumps(rows[-1]), flush=True)
    out = {"prompt_len": args.prompt_len, "burst": args.burst, "rows": rows}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
