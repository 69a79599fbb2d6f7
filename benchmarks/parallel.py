"""Parallel-instance benchmark on one multi-GPU host: TP, PP and EP, overlap on and off.

    python -m benchmarks.parallel --parts allreduce,dense --out par.jsonl     # ~6 min on 2xH200
    python -m benchmarks.parallel --parts moe --out par.jsonl                 # ~5 min
    python -m benchmarks.parallel --parts pp --out par.jsonl                  # ~3 min

Every result is one JSON line, printed and appended to `--out`. Parts:
  allreduce  NCCL vs one-shot all-reduce over 2 GPUs (benchmarks/allreduce.py; the same group code the engine uses) for the
             message sizes the dense steps send: [tokens, hidden] bf16, back to back and synced;
  dense      Llama-3-8B-shaped random checkpoint (made once, `--llama-dir`): decode step time
             at batch 1, 64, 256 with `--context` tokens of context, TP=1 vs TP=2, and for
             TP=2: overlap off under CUDA graphs, and with `--eager-overlap` an engine of its own
             without graphs: overlap off and on (two micro-batches, never captured); one prefill
             of `--prefill-len` tokens each way. With `allreduce` in the same run, each TP=2 batch
             also says how much of its all-reduce time (2 per layer) overlap hid, eager against
             eager. (Decode GEMMs are
             memory-bound: two micro-batches read the weights twice, so decode overlap is
             expected to lose; prefill is where it can win.)
  moe        Qwen3-30B-A3B-shaped random checkpoint (`--moe-layers` deep, 128 experts, top-8):
             decode throughput at batch 64 and 256, EP=2 (all-to-all; overlap off/on) vs
             TP=2 (experts split by intermediate dim; grouped GEMM; graphs on, and off in an
             engine of its own);
  shard      one GPU: the dense checkpoint at TP=1 beside the part one TP=2 rank holds (16 heads and 4 KV
             heads of 128, half the MLP, half the vocabulary), as a model of its own: decode steps and the
             prefill of `--prefill-len` tokens. Their ratio is what TP=2 / TP=1 would be with free
             collectives, and a TP=2 step on two GPUs less the shard's step is what its collectives cost;
  pp         PP=2 on the dense checkpoint at batch 256: throughput with 2 and 3 batches in the
             stages, 2 and 4 micro-batches, async sends on/off (each stage replays its layers per
             micro-batch as a decode graph).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from benchmarks.harness import (decode_sweep, drain, emit, ensure_llama8b, ensure_qwen3_moe, fill, in_fresh_process,
                                   make_engine, prefill_time, release_memory, timed_tokens, use_variant)
from benchmarks.profile import profile_steps

HIDDEN_8B = 4096


# -- parts ---------------------------------------------------------------------------------
def part_allreduce(args) -> dict[int, float]:
    """{num_tokens: µs per all-reduce of [num_tokens, hidden] as the engine does it} (benchmarks/allreduce.py:
    NCCL and the one-shot kernel side by side, back to back, synced and inside a CUDA graph)."""
    from benchmarks.allreduce import measure_all_reduce

    sizes = sorted(set(args.batches) | {args.prefill_len // 2, args.prefill_len})
    results, info = measure_all_reduce(sizes, args.hidden, args.device)
    engine_us = {}
    for num_tokens, row in sorted(results.items()):
        emit(args, {"part": "allreduce", "tokens": num_tokens, "bytes": num_tokens * args.hidden * 2, **row, **info})
        engine_us[num_tokens] = (row.get("one_shot_graph_us") or row.get("one_shot_loop_us") or row.get("nccl_graph_us")
                                 or row["nccl_loop_us"])
    return engine_us


def part_dense(args, allreduce_us: dict[int, float]) -> None:
    ensure_llama8b(args.llama_dir, args)  # made once, here; each layout's process finds it
    # (tp, all-reduce path): TP=1; TP=2 as the engine runs it (one-shot peer memory for small
    # messages); TP=2 on NCCL alone, the reference for what the one-shot kernel buys
    ways = [(1, "none"), (2, "engine")] + ([(2, "nccl")] if args.tp2_nccl else [])
    ways += [(2, "engine_normal_priority")] if args.tp2_normal_priority else []  # NCCL streams at normal priority
    ways += [(2, f"engine_ctas{args.tp2_nccl_ctas}")] if args.tp2_nccl_ctas else []  # NCCL on fewer SMs
    # each all-reduce fused with the residual add and RMSNorm after it (parallel/one_shot_norm.py)
    ways += [(2, "engine_fused_norm")] if args.tp2_fused_norm else []
    # decode overlap on and off, both eager: an engine without CUDA graphs (overlapped steps are never captured)
    ways += [(2, "engine_eager")] if args.eager_overlap else []
    for tp, way in ways:
        in_fresh_process(_dense_way, args, tp, way, allreduce_us)


def _dense_way(args, tp: int, way: str, allreduce_us: dict[int, float]) -> None:
    path = ensure_llama8b(args.llama_dir, args)
    t0 = time.time()
    extra = {"one_shot_all_reduce_max_bytes": 0} if way == "nccl" else {}
    extra |= {"comm_high_priority": False} if way == "engine_normal_priority" else {}
    extra |= {"nccl_max_ctas": args.tp2_nccl_ctas} if way.startswith("engine_ctas") else {}
    extra |= {"fuse_all_reduce_norm": True} if way == "engine_fused_norm" else {}
    engine = make_engine(path, args, cuda_graphs=way != "engine_eager", tensor_parallel_size=tp, **extra)
    info = {k: v for k, v in engine.executor.stats().items() if k.startswith("one_shot")} if tp > 1 else {}
    emit(args, {"part": "dense", "tp": tp, "allreduce": way, "engine_start_s": time.time() - t0, **info})
    # decode runs as captured CUDA graphs (eager decode is host-bound on this model: ~26 ms a
    # step on 2xH200, which would swamp any comparison); `--eager-overlap` adds the eager
    # micro-batch overlap of decode anyway (way `engine_eager`). Prefill is eager either way:
    # overlap on vs off. Async scheduling (the default) on and off: how much host work between
    # steps it hides
    if tp == 1:
        variants = {"single": {}, "single_sync": dict(async_scheduling=False)}
    elif way == "engine_eager":
        variants = {"overlap_off_eager": dict(overlap_tp=False), "overlap_on": dict(overlap_tp=True)}
    else:
        variants = {"overlap_off": dict(overlap_tp=False),
                    "overlap_off_sync": dict(overlap_tp=False, async_scheduling=False)}
    prefill_variants = dict(variants)
    if tp > 1 and way.startswith("engine"):
        prefill_variants["overlap_on"] = dict(overlap_tp=True)
    try:
        rows = decode_sweep(engine, args, tp, variants)
        for row in rows:
            row["allreduce"] = way
            if tp == 2 and row["batch"] in allreduce_us and way.startswith("engine"):
                row["allreduce_ms_per_step"] = 2 * engine.arch.num_layers * allreduce_us[row["batch"]] / 1e3
            emit(args, {"part": "dense", "phase": "decode", **row})
        if way == "engine_eager":
            _overlap_summary(args, rows, allreduce_us, engine.arch.num_layers)
            return  # its prefill is the `engine` way's: prefill is never captured
        prefill_rows = prefill_time(engine, args, prefill_variants)
        for row in prefill_rows:
            emit(args, {"part": "dense", "phase": "prefill", "tp": tp, "allreduce": way, **row})
        by = {row["variant"]: row["ms"] for row in prefill_rows}
        if "overlap_on" in by and args.prefill_len // 2 in allreduce_us:
            # overlap on sends 2 x 2 all-reduces per layer of half the tokens each
            comm_ms = 2 * 2 * engine.arch.num_layers * allreduce_us[args.prefill_len // 2] / 1e3
            emit(args, {"part": "dense", "phase": "prefill_overlap", "allreduce": way, "prefill_len": args.prefill_len,
                        "off_ms": by["overlap_off"], "on_ms": by["overlap_on"], "allreduce_ms_per_step": comm_ms,
                        "share_of_allreduce_hidden": (by["overlap_off"] - by["overlap_on"]) / comm_ms})
    finally:
        engine.shutdown()
        del engine
        release_memory()


def _overlap_summary(args, rows: list[dict], allreduce_us: dict[int, float], num_layers: int) -> None:
    """Decode overlap off and on, both eager (`rows`), beside the `engine` way's graphed step (from `--out`)."""
    by = {(r["batch"], r["variant"]): r["step_ms"] for r in rows}
    with open(args.out) as f:
        by |= {(r["batch"], r["variant"]): r["step_ms"] for r in map(json.loads, filter(str.strip, f))
               if r.get("part") == "dense" and r.get("phase") == "decode" and r.get("allreduce") == "engine"}
    for batch in args.batches:
        off, on = by.get((batch, "overlap_off_eager")), by.get((batch, "overlap_on"))
        if off is None or on is None:
            continue
        comm_ms = 2 * num_layers * allreduce_us[batch] / 1e3 if batch in allreduce_us else None
        emit(args, {"part": "dense", "phase": "overlap", "batch": batch, "eager_off_ms": off, "eager_on_ms": on,
                    "graph_off_ms": by.get((batch, "overlap_off")), "saved_ms": off - on, "allreduce_ms_per_step": comm_ms,
                    "share_of_allreduce_hidden": (off - on) / comm_ms if comm_ms else None})


def part_shard(args) -> None:
    """The full model and one TP=2 rank's shard of it, each at TP=1 in a process of its own, then their ratios."""
    paths = {"full": ensure_llama8b(args.llama_dir, args), "tp2_rank": ensure_llama8b(args.llama_dir + "-tp2-rank", args, 2)}
    for model, path in paths.items():
        in_fresh_process(_shard_way, args, model, path)
    with open(args.out) as f:
        rows = [r for r in map(json.loads, filter(str.strip, f)) if r.get("part") == "shard" and "model" in r]
    steps = {(r["model"], r.get("phase"), r.get("batch")): r.get("step_ms", r.get("ms")) for r in rows}
    for phase, batch in sorted({(p, b) for _, p, b in steps}, key=str):
        full, rank = steps.get(("full", phase, batch)), steps.get(("tp2_rank", phase, batch))
        if full and rank:
            emit(args, {"part": "shard", "phase": f"{phase}_ratio", "batch": batch, "full_ms": full, "tp2_rank_ms": rank,
                        "tp2_rank_over_full": rank / full})


def _shard_way(args, model: str, path: str) -> None:
    engine = make_engine(path, args)
    try:
        for row in decode_sweep(engine, args, 1, {"single": {}}, label={"model": model}):
            emit(args, {"part": "shard", "model": model, "phase": "decode", **row})
        for row in prefill_time(engine, args, {"single": {}}):
            emit(args, {"part": "shard", "model": model, "phase": "prefill", **row})
    finally:
        engine.shutdown()
        del engine
        release_memory()


def part_moe(args) -> None:
    from cluster.parallel.experts import expert_mlp, grouped_mm_available

    dtype = torch.float32 if args.smoke else torch.bfloat16
    probe = torch.randn(64, 256, device=args.device, dtype=dtype)
    counts = torch.tensor([20, 0, 44], device=args.device)
    w13 = torch.randn(3, 128, 256, device=args.device, dtype=dtype) / 16
    w2 = torch.randn(3, 256, 64, device=args.device, dtype=dtype) / 8
    grouped_ok = grouped_mm_available(probe)
    err = (expert_mlp(probe, counts, w13, w2, grouped=grouped_ok) - expert_mlp(probe, counts, w13, w2, grouped=False)).abs().max().item()
    emit(args, {"part": "moe", "grouped_mm": grouped_ok, "grouped_vs_loop_max_abs_diff": err})
    path = ensure_qwen3_moe(args.moe_dir, args.moe_layers, args)
    args_moe = argparse.Namespace(**{**vars(args), "batches": args.moe_batches})
    tp2 = dict(tensor_parallel_size=2)
    for name, sizes, graphs, variants in (
        ("ep2", dict(tensor_parallel_size=2, expert_parallel_size=2), True,  # (all-to-all runs eagerly)
         {"overlap_off": dict(overlap_ep=False, overlap_tp=False), "overlap_on": dict(overlap_ep=True, overlap_tp=True)}),
        # tp2 decodes as captured graphs (grouped GEMM, no host sync); eager, in an engine of its own, for the comparison
        ("tp2", tp2, True, {"overlap_off": dict(overlap_tp=False)}),
        ("tp2", tp2, False, {"overlap_off_eager": dict(overlap_tp=False)}),
    ):
        in_fresh_process(_moe_layout, args, args_moe, path, name, sizes, graphs, variants)


def _moe_layout(args, args_moe, path: str, name: str, sizes: dict, graphs: bool, variants: dict) -> None:
    t0 = time.time()
    engine = make_engine(path, args, cuda_graphs=graphs, **sizes)
    emit(args, {"part": "moe", "layout": name, "cuda_graphs": graphs, "layers": args.moe_layers,
                "engine_start_s": time.time() - t0})
    try:
        for row in decode_sweep(engine, args_moe, 2, variants):
            emit(args, {"part": "moe", "layout": name, **row})
        engine.executor.set_flags(overlap_ep=False, overlap_tp=False)
        load = engine.executor.stats(reset=True)["tokens_per_expert"]
        per_expert = torch.tensor(load, dtype=torch.float64).sum(0)
        emit(args, {"part": "moe", "layout": name, "expert_load_max_over_mean": (per_expert.max() / per_expert.mean()).item()})
    finally:
        engine.shutdown()
        del engine
        release_memory()


def part_pp(args) -> None:
    ensure_llama8b(args.llama_dir, args)  # made once, here; each partition's process finds it
    for partition in args.pp_partitions.split(","):
        in_fresh_process(_pp_partition, args, partition)


def _pp_partition(args, partition: str) -> None:
    path = ensure_llama8b(args.llama_dir, args)
    t0 = time.time()
    engine = make_engine(path, args, pipeline_parallel_size=2, pp_layer_partition=partition)
    layers = [len(r) for r in engine.executor.worker.stage_ranges]
    emit(args, {"part": "pp", "partition": partition, "layers_per_stage": layers, "engine_start_s": time.time() - t0})
    try:
        batch = args.pp_batch
        # two_batches: async scheduling keeps two batches of half the sequences in the stages (the
        # default); three_batches: a third, so stage 0 computes while the last stage returns rows;
        # one_batch: the whole batch per step, its micro-batches the only pipelining
        variants = {"two_batches_m1": dict(num_microbatches=1, async_pp=True, batches_in_flight=2),
                    "three_batches_m1": dict(num_microbatches=1, async_pp=True, batches_in_flight=3),
                    "two_batches_m2": dict(num_microbatches=2, async_pp=True, batches_in_flight=2),
                    "one_batch_m2": dict(num_microbatches=2, async_pp=True, async_scheduling=False),
                    "one_batch_m4": dict(num_microbatches=4, async_pp=True, async_scheduling=False),
                    "one_batch_m4_sync_send": dict(num_microbatches=4, async_pp=False, async_scheduling=False)}
        if partition != args.pp_partitions.split(",")[0]:  # another partition: the default variants, to compare
            variants = {name: variants[name] for name in ("two_batches_m1", "three_batches_m1")}
        fill(engine, batch, args.context, len(variants) * (2 * args.steps + 4) + 2 + (12 if args.profile else 0), tag="pp-")
        for name, flags in variants.items():
            use_variant(engine, flags)
            for _ in range(2):
                engine.step()
            wall_s, num_tokens = timed_tokens(engine, args.steps)
            emit(args, {"part": "pp", "partition": partition, "batch": batch, "context": args.context, "variant": name,
                        "step_ms": wall_s / args.steps * 1e3, "tokens_per_step": num_tokens / args.steps,
                        "tokens_per_s": num_tokens / wall_s})
        if args.profile:  # where the default's step goes on the driver: what the stages wait for
            use_variant(engine, variants["two_batches_m1"])
            emit(args, {"part": "profile", "pp": 2, "partition": partition, "variant": "two_batches_m1",
                        **profile_steps(engine, args.device)})
        engine.async_scheduling = True
        drain(engine)
    finally:
        engine.shutdown()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", default="allreduce,dense,moe,pp", help="comma list of allreduce, dense, shard, moe, pp")
    ap.add_argument("--llama-dir", default="/tmp/llm-cluster-bench/llama3-8b")
    ap.add_argument("--moe-dir", default="")
    ap.add_argument("--moe-layers", type=int, default=24, help="Qwen3-30B-A3B has 48; fewer keep the run short")
    ap.add_argument("--batches", default="1,64,256")
    ap.add_argument("--moe-batches", default="64,256")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=16, help="timed decode steps per window")
    ap.add_argument("--prefill-len", type=int, default=4096)
    ap.add_argument("--pp-batch", type=int, default=256, help="pp: decode batch")
    ap.add_argument("--pp-partitions", default="balanced,even",
                    help="pp: the layer partitions to time, one engine each (ParallelConfig.pp_layer_partition)")
    ap.add_argument("--max-model-len", type=int, default=4096 + 512)
    ap.add_argument("--out", default="parallel_bench.jsonl")
    ap.add_argument("--eager-overlap", action="store_true", help="also time decode overlap on/off eagerly")
    ap.add_argument("--tp2-nccl", action="store_true", help="dense: also TP=2 with NCCL alone (no one-shot all-reduce)")
    ap.add_argument("--tp2-normal-priority", action="store_true",
                    help="dense: also TP=2 with NCCL's streams at normal priority (ParallelConfig.comm_high_priority off)")
    ap.add_argument("--tp2-fused-norm", action="store_true",
                    help="dense: also TP=2 with each all-reduce fused with the add and RMSNorm after it")
    ap.add_argument("--tp2-nccl-ctas", type=int, default=0,
                    help="dense: also TP=2 with NCCL on at most this many thread blocks (ParallelConfig.nccl_max_ctas)")
    ap.add_argument("--profile", action="store_true", help="also print the driver's top kernels per decode step")
    ap.add_argument("--smoke", action="store_true", help="CPU + gloo + tiny models: checks the script, measures nothing")
    args = ap.parse_args(argv)
    args.device = "cpu" if args.smoke else "cuda"
    args.hidden = 64 if args.smoke else HIDDEN_8B
    args.batches = [int(b) for b in args.batches.split(",")]
    args.moe_batches = [int(b) for b in args.moe_batches.split(",")]
    args.moe_dir = args.moe_dir or os.path.join(os.path.dirname(args.llama_dir), f"qwen3-30b-a3b-{args.moe_layers}l")
    parts = args.parts.split(",")
    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    emit(args, {"part": "setup", "gpus": torch.cuda.device_count(), "device": device_name, "torch": torch.__version__,
                "parts": parts, "args": {k: v for k, v in vars(args).items() if k != "out"}})
    allreduce_us = part_allreduce(args) if "allreduce" in parts else {}
    for name, run in (("dense", lambda: part_dense(args, allreduce_us)), ("shard", lambda: part_shard(args)),
                      ("moe", lambda: part_moe(args)), ("pp", lambda: part_pp(args))):
        if name in parts:
            t0 = time.time()
            try:
                run()
            except Exception as exc:  # one part failing should not hide the others' results
                emit(args, {"part": name, "error": f"{type(exc).__name__}: {exc}"})
            emit(args, {"part": name, "seconds": time.time() - t0})


if __name__ == "__main__":
    main()
