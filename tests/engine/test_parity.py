"""Greedy tokens identical to transformers' `generate` for every architecture (float32, CPU).

Each checkpoint is checked plain, under a tiny chunked-prefill budget, with
shared prefixes that hit the prefix cache, and with a KV pool so small that
sequences are preempted and recomputed.
"""
from __future__ import annotations

import random

import pytest
import torch

from cluster.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from cluster.engine.engine import Engine
from cluster.types import SamplingParams
from tests.conftest import CHECKPOINTS

NEW_TOKENS = 32
PROMPT_LENS = (1, 5, 17, 40, 100, 16, 33, 300)


def _prompts(vocab: int) -> list[list[int]]:
    rng = random.Random(1)
    prompts = [[rng.randrange(vocab) for _ in range(n)] for n in PROMPT_LENS]
    shared = prompts[4][:64]  # two prompts that share 64 tokens with prompt 4: prefix-cache hits
    prompts += [shared + [rng.randrange(vocab) for _ in range(9)], shared + [rng.randrange(vocab) for _ in range(3)]]
    return prompts


def _hf_greedy(model_dir: str, prompts: list[list[int]]) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    out = []
    for p in prompts:
        ids = torch.tensor([p])
        gen = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                          min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        out.append(gen[0, len(p):].tolist())
    return out


def _engine_greedy(model_dir: str, prompts, cache=None, scheduler=None) -> tuple[list[list[int]], Engine]:
    cfg = EngineConfig(model=ModelConfig(path=model_dir), cache=cache or CacheConfig(),
                       scheduler=scheduler or SchedulerConfig())
    engine = Engine(cfg, progress=False)
    # min_tokens == max_tokens masks eos the way transformers' min_new_tokens does
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS)
    got: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    late = len(prompts) - 2  # the two shared-prefix prompts arrive once prompt 4 is cached
    for i, p in enumerate(prompts[:late]):
        engine.add_request(str(i), p, params)
    steps = 0
    while engine.has_unfinished() or steps == 0:
        if steps == 12:
            for i in range(late, len(prompts)):
                engine.add_request(str(i), prompts[i], params)
        for delta in engine.step():
            got[delta.request_id].extend(delta.token_ids)
        steps += 1
        assert steps < 10_000
    assert engine.kv.num_free_blocks == engine.kv.num_blocks, "KV blocks leaked"
    return [got[str(i)] for i in range(len(prompts))], engine


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_greedy_parity_with_transformers(checkpoint_dir, name):
    model_dir = checkpoint_dir(name)
    from cluster.models.hf_config import load_arch_config

    prompts = _prompts(load_arch_config(model_dir).vocab_size)
    expected = _hf_greedy(model_dir, prompts)
    assert len({t for seq in expected for t in seq}) > 20, "degenerate checkpoint: outputs barely vary"

    plain, engine = _engine_greedy(model_dir, prompts)
    assert plain == expected
    assert engine.kv.prefix_hit_rate() > 0, "shared prompts should have hit the prefix cache"

    chunked, _ = _engine_greedy(model_dir, prompts, scheduler=SchedulerConfig(max_num_batched_tokens=29))
    assert chunked == expected

    # 400 + 32 tokens need 27 blocks of 16; 30 blocks force preemption with ten prompts in flight
    small, engine = _engine_greedy(model_dir, prompts, cache=CacheConfig(num_blocks=30), scheduler=SchedulerConfig(max_num_batched_tokens=512))
    assert engine.scheduler.num_preemptions > 0
    assert small == expected
