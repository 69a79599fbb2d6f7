"""Engine benchmark on one GPU: decode step time, prefill throughput, offline throughput.

    python -m benchmarks.engine --model DIR [--make-llama8b] --out results.json

  (1) hardware limits measured first, in the same process (HBM GB/s, bf16 TFLOP/s);
  (2) optional baseline: transformers `generate` with a static cache on the same GPU;
  (3) decode step time at each batch size with `--context` tokens of context each,
      beside the HBM roofline (weights + KV bytes read / measured bandwidth);
  (4) prefill of one `--prefill-len` prompt as a fraction of measured and datasheet peak;
  (5) offline throughput: `--requests` prompts of `--in-len` random tokens, `--out-len` out;
  (6) a torch.profiler table of the slowest kernels of a decode step.
"""
from __future__ import annotations

import argparse
import gc
import json
import random
import time

import torch

from benchmarks import hardware
from cluster.config import CacheConfig, EngineConfig, ModelConfig, RunnerConfig, SchedulerConfig
from cluster.runtime.gc_pauses import freeze_startup_objects
from cluster.types import SamplingParams


def _prompts(num: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 100) for _ in range(length)] for _ in range(num)]


def _engine(args, max_num_seqs: int, budget_tokens: int):
    from cluster.engine.engine import Engine

    cfg = EngineConfig(
        model=ModelConfig(path=args.model, dtype="bfloat16", max_model_len=args.max_model_len),
        cache=CacheConfig(gpu_memory_fraction=0.9, enable_prefix_caching=False),
        scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget_tokens),
        runner=RunnerConfig(device="cuda", enable_cuda_graphs=not args.no_cuda_graphs, cuda_graph_max_batch=max_num_seqs),
    )
    engine = Engine(cfg, progress=False)
    # as an instance actor does: what start-up made goes to the permanent generation, so a full
    # collection in the timed steps walks only what the steps made (unfrozen, one walks ~220k objects
    # for ~130 ms, and whether it lands in a timed window depends on what the process allocated before)
    freeze_startup_objects()
    return engine


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def bench_decode(engine, batch: int, context: int, vocab: int, num_steps: int, hw: dict) -> dict:
    """Fill `batch` sequences to `context` tokens, then time pure decode steps."""
    params = SamplingParams(temperature=0.0, max_tokens=num_steps + 8, ignore_eos=True)
    for i, p in enumerate(_prompts(batch, context, vocab, seed=batch)):
        engine.add_request(f"d{batch}-{i}", p, params)
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in engine.scheduler.running + list(engine.scheduler.waiting)):
        engine.step()
    for _ in range(3):
        engine.step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(num_steps):
        engine.step()
    torch.cuda.synchronize()
    step_ms = (time.perf_counter() - t0) * 1e3 / num_steps
    kv_bytes = _kv_bytes_per_token(engine) * batch * (context + 3 + num_steps // 2)  # mean context over the timed steps
    wbytes = weight_bytes(engine.model)
    roofline_ms = (wbytes + kv_bytes) / (hw["hbm_gb_s"] * 1e9) * 1e3
    while engine.has_unfinished():
        engine.step()
    return {"batch": batch, "context": context, "step_ms": step_ms, "roofline_ms": roofline_ms,
            "x_roofline": step_ms / roofline_ms, "tokens_per_s": batch / step_ms * 1e3,
            "weight_bytes": wbytes, "kv_bytes": kv_bytes}


def _kv_bytes_per_token(engine) -> int:
    k, _ = next(c for c in engine.runner.kv_caches if c is not None)
    return 2 * k[0, 0].numel() * k.element_size() * len(engine.model.model.layers)


def bench_prefill(engine, length: int, vocab: int, hw: dict) -> dict:
    params = SamplingParams(temperature=0.0, max_tokens=1)
    times = []
    for i, p in enumerate(_prompts(4, length, vocab, seed=7)):
        engine.add_request(f"p{i}", p, params)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        while engine.has_unfinished():
            engine.step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    seconds = min(times[1:])
    cfg = engine.arch
    linear_flops = 2 * (weight_bytes(engine.model) // 2 - cfg.vocab_size * cfg.hidden_size) * length
    attn_flops = 2 * 2 * cfg.num_layers * cfg.num_heads * cfg.head_dim * length * length / 2
    tflops = (linear_flops + attn_flops) / seconds / 1e12
    return {"prompt_len": length, "ms": seconds * 1e3, "tflops": tflops,
            "fraction_of_measured_peak": tflops / hw["bf16_tflops"],
            "fraction_of_spec_peak": tflops / hw["spec"].get("bf16_tflops", float("nan"))}


def bench_offline(engine, num: int, in_len: int, out_len: int, vocab: int) -> dict:
    params = SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True)
    prompts = _prompts(num, in_len, vocab, seed=11)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(f"o{i}", p, params)
    num_out = 0
    while engine.has_unfinished():
        num_out += len(engine.step())
    seconds = time.perf_counter() - t0
    return {"requests": num, "in_len": in_len, "out_len": out_len, "seconds": seconds,
            "output_tokens_per_s": num_out / seconds, "total_tokens_per_s": (num_out + num * in_len) / seconds}


def bench_hf(model_dir: str, num: int, in_len: int, out_len: int, batch: int, vocab: int) -> dict:
    """transformers `generate`, static cache, greedy, on the same GPU."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16, device_map="cuda")
    prompts = _prompts(num, in_len, vocab, seed=11)
    ids = torch.tensor(prompts[:batch], device="cuda")
    kwargs = dict(max_new_tokens=out_len, min_new_tokens=out_len, do_sample=False, cache_implementation="static",
                  attention_mask=torch.ones_like(ids), pad_token_id=0)
    # transformers compiles the forward for a static cache; warm up with the exact shapes timed below
    model.generate(ids, **kwargs)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model.generate(ids, **kwargs)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return {"batch": batch, "in_len": in_len, "out_len": out_len, "seconds": seconds,
            "output_tokens_per_s": batch * out_len / seconds, "step_ms": seconds / out_len * 1e3}


def profile_decode(engine, batch: int, context: int, vocab: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    for i, p in enumerate(_prompts(batch, context, vocab, seed=3)):
        engine.add_request(f"prof{i}", p, params)
    for _ in range(6):
        engine.step()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            engine.step()
        torch.cuda.synchronize()
    while engine.has_unfinished():
        engine.step()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=15)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--make-llama8b", action="store_true", help="first make a Llama-3-8B-shaped random checkpoint at --model")
    ap.add_argument("--batch-sizes", default="1,32,128")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--decode-steps", type=int, default=32)
    ap.add_argument("--prefill-len", type=int, default=2048)
    ap.add_argument("--requests", type=int, default=512)
    ap.add_argument("--in-len", type=int, default=512)
    ap.add_argument("--out-len", type=int, default=256)
    ap.add_argument("--hf-batch", type=int, default=128, help="transformers baseline batch (0: skip)")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--no-cuda-graphs", action="store_true")
    ap.add_argument("--out", default="engine_bench.json")
    args = ap.parse_args(argv)
    if args.make_llama8b:
        from cluster.models.make import make_llama3_8b_shape

        t0 = time.time()
        make_llama3_8b_shape(args.model)
        print(f"made checkpoint in {time.time() - t0:.0f}s", flush=True)
    results = {"hardware": hardware.measure()}
    hw = results["hardware"]
    print(json.dumps(hw), flush=True)
    from cluster.models.hf_config import load_arch_config

    vocab = load_arch_config(args.model).vocab_size
    if args.hf_batch:
        results["hf_generate"] = bench_hf(args.model, args.requests, args.in_len, args.out_len, args.hf_batch, vocab)
        print(json.dumps(results["hf_generate"]), flush=True)
    batches = [int(b) for b in args.batch_sizes.split(",")]
    t0 = time.time()
    engine = _engine(args, max_num_seqs=256, budget_tokens=8192)
    results["engine_init_s"] = time.time() - t0
    results["decode"] = []
    for b in batches:
        results["decode"].append(bench_decode(engine, b, args.context, vocab, args.decode_steps, hw))
        print(json.dumps(results["decode"][-1]), flush=True)
    results["prefill"] = bench_prefill(engine, args.prefill_len, vocab, hw)
    print(json.dumps(results["prefill"]), flush=True)
    results["offline"] = bench_offline(engine, args.requests, args.in_len, args.out_len, vocab)
    if "hf_generate" in results:
        results["offline"]["x_hf"] = results["offline"]["output_tokens_per_s"] / results["hf_generate"]["output_tokens_per_s"]
    print(json.dumps(results["offline"]), flush=True)
    results["profile_decode_b1"] = profile_decode(engine, 1, args.context, vocab)
    print(results["profile_decode_b1"], flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
