"""Read a Hugging Face `config.json` into the few numbers our models need.

Every architecture the cluster serves is a Llama-style decoder; they differ in
a handful of switches (qkv bias, q/k norm, MoE routing), collected here so the
model code reads one flat, validated dataclass instead of raw JSON.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}


class UnsupportedModelError(ValueError):
    pass


@dataclass(frozen=True)
class ArchConfig:
    family: str  # llama | mistral | qwen2 | qwen3 | mixtral | qwen2_moe | qwen3_moe
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    sliding_window: int | None
    eos_token_ids: tuple[int, ...]
    # MoE (num_experts == 0: dense)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    norm_topk_prob: bool = False
    dense_layer_ids: tuple[int, ...] = ()  # layers that keep a dense MLP in an MoE model

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0


def load_arch_config(model_dir: str) -> ArchConfig:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{model_dir} is not a Hugging Face checkpoint directory: config.json is missing")
    with open(path) as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from None
    gen_path = os.path.join(model_dir, "generation_config.json")
    if os.path.isfile(gen_path):  # generation_config's eos ids win, as in transformers
        with open(gen_path) as f:
            gen_eos = json.load(f).get("eos_token_id")
        if gen_eos is not None:
            raw = {**raw, "eos_token_id": gen_eos}
    return parse_arch_config(raw)


def parse_arch_config(raw: dict) -> ArchConfig:
    archs = raw.get("architectures") or []
    family = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if family is None:
        raise UnsupportedModelError(
            f"unsupported architecture {archs or raw.get('model_type')!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    num_heads = raw["num_attention_heads"]
    hidden = raw["hidden_size"]
    eos = raw.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
    moe = _moe_fields(family, raw)
    return ArchConfig(
        family=family,
        vocab_size=raw["vocab_size"],
        hidden_size=hidden,
        intermediate_size=raw.get("intermediate_size", 0),
        num_layers=raw["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=raw.get("num_key_value_heads") or num_heads,
        head_dim=raw.get("head_dim") or hidden // num_heads,
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        rope_theta=_rope_theta(raw),
        rope_scaling=_rope_scaling(raw),
        max_position_embeddings=raw.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        qkv_bias=family in ("qwen2", "qwen2_moe") or bool(raw.get("attention_bias", False)),
        qk_norm=family in ("qwen3", "qwen3_moe"),
        sliding_window=raw.get("sliding_window") if raw.get("use_sliding_window", family == "mistral") else None,
        eos_token_ids=eos_ids,
        **moe,
    )


def _rope_theta(raw: dict) -> float:
    params = raw.get("rope_parameters") or {}
    return float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))


def _rope_scaling(raw: dict) -> dict | None:
    scaling = raw.get("rope_scaling") or raw.get("rope_parameters") or None
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return None
    if kind != "llama3":
        raise UnsupportedModelError(f"rope scaling type {kind!r} is not supported (supported: llama3)")
    return dict(scaling)


def _moe_fields(family: str, raw: dict) -> dict:
    if family == "mixtral":
        return dict(num_experts=raw["num_local_experts"], num_experts_per_tok=raw["num_experts_per_tok"],
                    moe_intermediate_size=raw["intermediate_size"], norm_topk_prob=True)
    if family in ("qwen2_moe", "qwen3_moe"):
        step = raw.get("decoder_sparse_step", 1) or 1
        dense = set(raw.get("mlp_only_layers") or [])
        dense |= {i for i in range(raw["num_hidden_layers"]) if (i + 1) % step != 0}
        num_experts = raw.get("num_experts", raw.get("num_local_experts"))  # transformers 5 renames it
        return dict(num_experts=num_experts, num_experts_per_tok=raw["num_experts_per_tok"],
                    moe_intermediate_size=raw["moe_intermediate_size"],
                    shared_expert_intermediate_size=raw.get("shared_expert_intermediate_size", 0) if family == "qwen2_moe" else 0,
                    norm_topk_prob=bool(raw.get("norm_topk_prob", family == "qwen3_moe")),
                    dense_layer_ids=tuple(sorted(dense)))
    return {}
