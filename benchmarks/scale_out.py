"""How long a scale-out takes, decision to serving, and what it is made of: the runtime's own `launch`
and `join` (what the autoscaler's actuator calls) of one more instance beside a running one.

  cold       the first instance, with Ray's start, the process's imports, weights from disk
  scale-out  `--repeats` more instances, one after another (each released before the next), with the
             OS page cache and the Triton cache warm from the first: placement (a pending placement
             group; here a GPU share is free at once), the instance's start by phase (since its
             module's import, tokenizer, weights, KV cache, warm-up, CUDA graphs, the prefill-rate
             probe), and joining the router (its first stats, its links)

    python -m benchmarks.scale_out --model /tmp/llama8b --gpu-share 0.45 --kv-gib 8 --out scale_out.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import time

from cluster.config import (CacheConfig, ClusterConfig, EngineConfig, ModelConfig, PoolConfig, RunnerConfig,
                            SchedulerConfig)


def config_for(args) -> ClusterConfig:
    on_gpu = args.device == "cuda"
    engine = EngineConfig(model=ModelConfig(path=args.model, max_model_len=args.max_model_len),
                          cache=CacheConfig(memory_budget_bytes=int(args.kv_gib * 2**30) if on_gpu else None,
                                            num_blocks=None if on_gpu else 256),
                          scheduler=SchedulerConfig(max_num_batched_tokens=4096),
                          runner=RunnerConfig(device=args.device))
    pool = PoolConfig(instances=1, num_cpus_per_rank=1, num_gpus_per_rank=args.gpu_share if on_gpu else 0)
    return ClusterConfig(engine=engine, prefill=PoolConfig(instances=0), decode=PoolConfig(instances=0), mixed=pool)


async def measure(args) -> dict:
    from cluster.runtime.launcher import Cluster
    from cluster.types import Role

    cluster = Cluster(config_for(args))
    t0 = time.monotonic()
    await cluster.start()
    first = next(iter(cluster.client.instances.values()))
    out = {"cold_start_s": time.monotonic() - t0, "cold_instance_start_s": first.startup_s, "scale_outs": []}
    try:
        for _ in range(args.repeats):
            decided = time.monotonic()
            launch = cluster.launch(Role.MIXED)
            took = await cluster.join(launch)
            view = cluster.client.instances[launch.instance_id]
            out["scale_outs"].append({"total_s": time.monotonic() - decided, **took, "instance_start_s": view.startup_s})
            await cluster.release(launch.instance_id)
    finally:
        await cluster.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--make-llama8b", action="store_true", help="make a Llama-3-8B-shaped random checkpoint at --model first")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--gpu-share", type=float, default=0.45, help="Ray GPUs per instance (two share one GPU)")
    ap.add_argument("--kv-gib", type=float, default=8.0, help="KV cache per instance, GiB")
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default="scale_out.json")
    args = ap.parse_args()
    if args.make_llama8b and not os.path.isdir(args.model):
        from cluster.models.make import make_llama3_8b_shape

        make_llama3_8b_shape(args.model)
    result = asyncio.run(measure(args))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({"cold_start_s": round(result["cold_start_s"], 2),
                      "scale_outs": [{k: (round(v, 2) if isinstance(v, float) else {p: round(s, 2) for p, s in v.items()})
                                      for k, v in s.items()} for s in result["scale_outs"]]}, indent=1))


if __name__ == "__main__":
    main()
