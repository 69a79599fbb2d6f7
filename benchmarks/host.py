"""The engine's host work per decode step, without the model: what sits between two GPU steps.

    python -m benchmarks.host --batch 64 --context 1024      # CPU is enough: nothing runs on a device

An engine on CPU with a tiny random checkpoint (made once at `--model`) holds `--batch` sequences
with `--context` tokens each; then, `--steps` times, the phases of a decode step that run on the
host are timed one by one: schedule, plan (step_plan.plan_step), pack (the multi-rank wire form),
upload (host buffers to the device tensors; a copy on CPU), update + emit (scheduler update with
made-up sampled tokens, then each one detokenized and looked at for stop strings). Medians in µs, one JSON line.
The model's forward and the sampling are left out: they are the device's part.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time

from cluster.config import CacheConfig, EngineConfig, ModelConfig, RunnerConfig, SchedulerConfig


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="/tmp/llm-cluster-bench/tiny-llama")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args(argv)
    from benchmarks.harness import fill
    from cluster.engine.engine import Engine
    from cluster.engine.step_plan import pack, plan_step
    from cluster.models.tokenizer import Tokenizer

    if not os.path.isdir(args.model):
        from cluster.models.make import make_model

        make_model("llama", args.model, num_layers=2, max_position_embeddings=4 * args.context, progress=False)
    cfg = EngineConfig(model=ModelConfig(path=args.model, dtype="float32", max_model_len=2 * args.context),
                       cache=CacheConfig(memory_budget_bytes=4 << 30),
                       scheduler=SchedulerConfig(max_num_seqs=max(256, args.batch), max_num_batched_tokens=8192),
                       runner=RunnerConfig(device="cpu", async_scheduling=False))  # the phases are called by hand
    engine = Engine(cfg, tokenizer=Tokenizer.from_dir(args.model), progress=False)
    fill(engine, args.batch, args.context, args.steps + 1, tag="r")
    rng = random.Random(0)
    spent: dict[str, list[float]] = {k: [] for k in ("schedule", "plan", "pack", "upload", "update_emit")}
    for _ in range(args.steps):
        t0 = time.perf_counter()
        sched = engine.scheduler.schedule()
        t1 = time.perf_counter()
        plan = plan_step(sched, engine.kv.block_size)
        t2 = time.perf_counter()
        pack(plan, 1)
        t3 = time.perf_counter()
        engine.runner.upload(plan)
        t4 = time.perf_counter()
        engine.scheduler.update(sched, {item.seq.seq_id: rng.randrange(100, 1000) for item in sched.scheduled})
        for item in sched.scheduled:  # what the engine's emit does of each token: detokenize, look for stops
            if item.samples:
                engine.requests[item.seq.request_id].texts[item.seq.index].push(item.seq.token_ids[-1])
        t5 = time.perf_counter()
        for key, a, b in (("schedule", t0, t1), ("plan", t1, t2), ("pack", t2, t3), ("upload", t3, t4), ("update_emit", t4, t5)):
            spent[key].append((b - a) * 1e6)
    print(json.dumps({"batch": args.batch, "context": args.context, "us_median": {k: round(statistics.median(v), 1)
                                                                               for k, v in spent.items()}}))


if __name__ == "__main__":
    main()
