"""ParallelConfig refuses what cannot be split, naming the field; LLM's arguments reach it."""
from __future__ import annotations

import pytest

from cluster.config import ConfigError, EngineConfig, ModelConfig, ParallelConfig, from_dict
from cluster.llm import _parallel

DENSE = dict(num_heads=32, num_kv_heads=8, num_layers=32, intermediate_size=14336)


def test_sizes_and_switches_are_validated():
    with pytest.raises(ConfigError, match="ParallelConfig.tensor_parallel_size=0"):
        ParallelConfig(tensor_parallel_size=0)
    with pytest.raises(ConfigError, match="ParallelConfig.expert_parallel_size=2 must be 1 or tensor_parallel_size"):
        ParallelConfig(tensor_parallel_size=4, expert_parallel_size=2)
    with pytest.raises(ConfigError, match="ParallelConfig.master_port=70000"):
        ParallelConfig(master_port=70000)
    with pytest.raises(ConfigError, match="ParallelConfig.num_pp_microbatches=-1"):
        ParallelConfig(num_pp_microbatches=-1)
    cfg = from_dict(EngineConfig, {"parallel": {"tensor_parallel_size": 2, "pipeline_parallel_size": 2}})
    assert cfg.parallel.world_size == 4 and cfg.parallel.num_microbatches == 2


@pytest.mark.parametrize("parallel,model,message", [
    (dict(tensor_parallel_size=3), DENSE, "tensor_parallel_size=3 must divide num_attention_heads=32"),
    (dict(tensor_parallel_size=8), dict(DENSE, intermediate_size=1004), "tensor_parallel_size=8 must divide intermediate_size=1004"),
    (dict(tensor_parallel_size=4), dict(DENSE, num_kv_heads=6, num_heads=24),
     "tensor_parallel_size=4 must divide num_key_value_heads=6 or be a multiple of it"),
    (dict(pipeline_parallel_size=3, pp_layer_partition="even"), DENSE,
     "pipeline_parallel_size=3 must divide num_hidden_layers=32 \\(pp_layer_partition=even\\)"),
    (dict(pipeline_parallel_size=40), DENSE, "pipeline_parallel_size=40 must be at most num_hidden_layers=32"),
    (dict(pipeline_parallel_size=2, pp_layer_partition="15,16"), DENSE,
     "pp_layer_partition='15,16' must be balanced, even, or 2 layer counts >= 1 that add up to num_hidden_layers=32"),
    (dict(pipeline_parallel_size=2, pp_layer_partition="32,0"), DENSE, "pp_layer_partition='32,0'"),
    (dict(pipeline_parallel_size=2, pp_layer_partition="x"), DENSE, "pp_layer_partition='x'"),
    (dict(tensor_parallel_size=2, expert_parallel_size=2), dict(DENSE, num_experts=7, moe_intermediate_size=64),
     "expert_parallel_size=2 must divide num_experts=7"),
    (dict(tensor_parallel_size=2), dict(DENSE, num_experts=8, moe_intermediate_size=63),
     "tensor_parallel_size=2 must divide moe_intermediate_size=63"),
])
def test_model_that_cannot_be_split_names_the_field(parallel, model, message):
    with pytest.raises(ConfigError, match=message):
        ParallelConfig(**parallel).check_model(**model)


def test_kv_heads_may_be_replicated():
    ParallelConfig(tensor_parallel_size=8).check_model(**dict(DENSE, num_kv_heads=2))


def test_llm_arguments_override_sizes():
    base = ParallelConfig(overlap_tp_comm=True, pipeline_parallel_size=2)
    got = _parallel(base, 2, None, True)
    assert (got.tensor_parallel_size, got.pipeline_parallel_size, got.expert_parallel_size) == (2, 2, 2)
    assert got.overlap_tp_comm
    assert _parallel(None, None, None, None) == ParallelConfig()


def test_engine_refuses_before_starting_ranks(checkpoint_dir):
    from cluster.engine.engine import Engine

    cfg = EngineConfig(model=ModelConfig(path=checkpoint_dir("llama")), parallel=ParallelConfig(tensor_parallel_size=3))
    with pytest.raises(ConfigError, match="tensor_parallel_size=3 must divide num_attention_heads=4"):
        Engine(cfg, progress=False)


def test_pipeline_stages_take_contiguous_layers_balanced_against_the_lm_head():
    """Balanced: stage 0 also reads the LM head, so it takes that many layers' worth fewer (the
    Llama-3-8B shape: 15 + 17); even and explicit partitions as asked; every layer in one stage."""
    from types import SimpleNamespace

    from cluster.parallel.pipeline import balanced_counts, lm_head_layers, stage_ranges

    llama8b = SimpleNamespace(num_layers=32, hidden_size=4096, head_dim=128, num_heads=32, num_kv_heads=8,
                              intermediate_size=14336, num_experts=0, vocab_size=128256)
    assert 2.3 < lm_head_layers(llama8b) < 2.5  # 525M LM head weights against 218M per layer
    assert [len(r) for r in stage_ranges(llama8b, 2)] == [15, 17]
    assert [len(r) for r in stage_ranges(llama8b, 4)] == [6, 8, 9, 9]
    assert [len(r) for r in stage_ranges(llama8b, 2, "even")] == [16, 16]
    assert [len(r) for r in stage_ranges(llama8b, 2, "10,22")] == [10, 22]
    for num_stages in (1, 2, 3, 4, 5, 8):
        ranges = stage_ranges(llama8b, num_stages)
        assert [layer for r in ranges for layer in r] == list(range(32)) and all(len(r) >= 1 for r in ranges)
    # however heavy the LM head, no stage is left without a layer
    assert balanced_counts(4, 4, 100.0) == [1, 1, 1, 1] and balanced_counts(2, 2, 0.0) == [1, 1]
    with pytest.raises(ConfigError, match="pp_layer_partition=''"):
        ParallelConfig(pp_layer_partition="")
