"""Shared fixtures: tiny random checkpoints made once per test session with `transformers`."""
from __future__ import annotations

import os

import pytest

# Tiny checkpoints, one per architecture; variants cover tied embeddings, MQA,
# llama3 rope scaling and a sharded safetensors index.
CHECKPOINTS = {
    "llama": dict(arch="llama"),
    "llama_tied_mqa_rope3_sharded": dict(
        arch="llama", num_kv_heads=1, tie_word_embeddings=True, max_shard_size="100KB",
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 256},
    ),
    "llama_4_layers": dict(arch="llama", num_layers=4),  # two stages that can differ (balanced: 1 + 3)
    # heads wider than hidden / num_heads (the shape of one tensor-parallel rank of Llama-3-8B: 16 x 128 vs 4096)
    "llama_head_dim": dict(arch="llama", head_dim=32),
    "mistral": dict(arch="mistral"),
    "qwen2": dict(arch="qwen2"),
    "qwen3": dict(arch="qwen3"),
    "mixtral": dict(arch="mixtral"),
    "qwen2_moe": dict(arch="qwen2_moe"),
    "qwen3_moe": dict(arch="qwen3_moe"),
}


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    made: dict[str, str] = {}

    def get(name: str) -> str:
        if name not in made:
            from cluster.models.make import make_model

            spec = dict(CHECKPOINTS[name])
            made[name] = make_model(spec.pop("arch"), os.path.join(root, name), progress=False, **spec)
        return made[name]

    return get


def pytest_runtest_logreport(report):
    """LLM_CLUSTER_REPORT_AT_ONCE=1 prints each failure's traceback the moment it fails: a GPU call
    killed at its time limit never reaches pytest's report at the end (2026-11-30 lost two reasons)."""
    if report.failed and os.environ.get("LLM_CLUSTER_REPORT_AT_ONCE") == "1":
        import sys

        print(f"\n=== {report.nodeid} ({report.when}) failed ===\n{report.longreprtext}\n", file=sys.__stderr__, flush=True)
