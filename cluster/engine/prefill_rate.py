"""An engine's prefill rate before it serves: one step filled with prompts, timed (admission's
first estimate, runtime/admission.py, until the instance has had a queue to measure)."""
from __future__ import annotations

import random
import time

from cluster.types import SamplingParams


def measure_prefill_rate(engine, runs: int = 2) -> float | None:
    """Prompt tokens/s of one step filled with prompts (the scheduler's budget of them, each as long as
    the model and half the KV pool take, up to that budget), the last of `runs` timed (the first
    compiles kernels on a GPU); None if they did not run in a bounded number of steps. The prompts are
    random and their KV is released at once."""
    budget = engine.scheduler.config.max_num_batched_tokens
    kv_tokens = engine.kv.num_blocks * engine.kv.block_size
    length = max(1, min(budget, engine.max_model_len - 1, kv_tokens // 2))
    count = max(1, min(budget // length, kv_tokens // 2 // length))
    rng = random.Random(0)
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    rate = None
    for run in range(runs):
        ids = [f"__prefill-rate-{run}-{i}" for i in range(count)]
        for request_id in ids:
            engine.add_request(request_id, [rng.randrange(10, engine.arch.vocab_size) for _ in range(length)], params)
        _sync(engine)
        t0, steps = time.perf_counter(), 0
        while steps < 4 * count + 8 and any(
                engine.requests[r].seqs[0].num_computed_tokens < length for r in ids if r in engine.requests):
            engine.step()
            steps += 1
        _sync(engine)
        done = all(r not in engine.requests or engine.requests[r].seqs[0].num_computed_tokens >= length for r in ids)
        rate = count * length / (time.perf_counter() - t0) if done else None
        for request_id in ids:
            engine.release(request_id)
        while engine.has_unfinished():  # the step in flight, if any
            engine.step()
    return rate


def _sync(engine) -> None:
    if engine.device.type == "cuda":
        import torch

        torch.cuda.synchronize(engine.device)
