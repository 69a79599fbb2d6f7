"""The runner's warm-up: every kernel variant runs once before the instance serves (on a GPU,
Triton compiles each on first use, for a second or more: 2xH200 lost 2.4-3.8 s of TTFT to it), and
it leaves no trace: no KV written, no expert load counted."""
from __future__ import annotations

import torch

from cluster.engine.runner import ModelRunner
from cluster.models.registry import build_model
from cluster.models.moe import StackedExperts


def test_the_warm_up_runs_a_prefill_and_leaves_no_kv_and_no_expert_load(checkpoint_dir):
    model = build_model(checkpoint_dir("qwen3_moe"), torch.float32, torch.device("cpu"), 256)
    calls = []
    model.register_forward_hook(lambda module, args, out: calls.append((args[0].shape[0], args[2].meta.max_query_len)))
    runner = ModelRunner(model, num_blocks=32, block_size=16, device=torch.device("cpu"), dtype=torch.float32,
                         max_model_len=256)
    assert calls == [(63, 40)]  # one forward: two prompts of 40 and 23 tokens, the prefill launch
    assert not runner.kv_stack.any()  # every slot was -1
    experts = [m for m in model.modules() if isinstance(m, StackedExperts)]
    assert experts and all(not e.tokens_per_expert.any() and e.counts_load for e in experts)
