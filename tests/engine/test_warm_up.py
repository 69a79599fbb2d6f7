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


def test_a_step_uploads_each_field_16_byte_aligned_whatever_its_token_count(checkpoint_dir):
    """Triton compiles a variant per pointer alignment: a field of the step's one upload that started
    at an odd int64 offset (an odd token count before it) made a compile mid-serving on 2xH200, which
    the warm-up (its own tensors) had not run. Every field starts 16-byte aligned, with its values."""
    import numpy as np

    from cluster.engine.step_plan import StepPlan

    model = build_model(checkpoint_dir("llama"), torch.float32, torch.device("cpu"), 256)
    runner = ModelRunner(model, num_blocks=32, block_size=16, device=torch.device("cpu"), dtype=torch.float32,
                         max_model_len=256)
    for lengths in ([3], [1, 1, 1], [5, 2], [4, 3, 1, 1, 1]):
        starts = [sum(lengths[:i]) for i in range(len(lengths) + 1)]
        n = starts[-1]
        plan = StepPlan(input_ids=list(range(7, 7 + n)), positions=list(range(100, 100 + n)),
                        slot_mapping=list(range(n)), query_start_loc=starts, seq_lens=[x + 2 for x in lengths],
                        block_tables=np.arange(len(lengths) * 3, dtype=np.int32).reshape(len(lengths), 3),
                        logits_indices=[s - 1 for s in starts[1:]])
        inputs = runner.upload(plan)
        meta = inputs.meta
        fields = {"input_ids": (inputs.input_ids, plan.input_ids), "positions": (inputs.positions, plan.positions),
                  "slot_mapping": (meta.slot_mapping, plan.slot_mapping),
                  "logits_indices": (inputs.logits_indices, plan.logits_indices),
                  "query_start_loc": (meta.query_start_loc, plan.query_start_loc),
                  "seq_lens": (meta.seq_lens, plan.seq_lens),
                  "block_tables": (meta.block_tables, plan.block_tables.tolist())}
        for name, (tensor, values) in fields.items():
            assert tensor.data_ptr() % 16 == 0, (name, lengths)
            assert tensor.tolist() == values, (name, lengths)
