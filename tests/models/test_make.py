"""make_model: true HF checkpoints for every arch, seeded, sharded, atomic, with clear logit gaps."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from cluster.models import make
from cluster.models.make import ARCHS, make_model

transformers = pytest.importorskip("transformers")

PROMPTS = ("The old lighthouse keeper", "def count_tokens(items):", "今天天气很好", "Bonjour, comment ça va ?")
NUM_NEW_TOKENS = 24
MIN_GAP = 1e-3  # top-2 logit gap the parity tests need to be safe from summation-order noise


@pytest.fixture(scope="session")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """One default tiny checkpoint per arch."""
    root = tmp_path_factory.mktemp("made")
    return {arch: make_model(arch, str(root / arch), progress=False) for arch in ARCHS}


def _tensors(path: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), "pt") as f:
                out.update({key: f.get_tensor(key) for key in f.keys()})
    return out


def _file_hashes(path: str) -> dict[str, str]:
    return {name: hashlib.sha256(Path(path, name).read_bytes()).hexdigest() for name in os.listdir(path)}


def _json(*parts: str) -> dict:
    return json.loads(Path(*parts).read_text(encoding="utf-8"))


def _greedy(path: str) -> tuple[list[float], list[list[int]]]:
    """Top-2 logit gaps of every greedy step over PROMPTS, and the generated ids."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    gaps, outputs = [], []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=NUM_NEW_TOKENS, do_sample=False, output_logits=True,
                                 return_dict_in_generate=True, eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
        for logits in out.logits:
            top2 = torch.topk(logits[0], 2).values
            gaps.append(float(top2[0] - top2[1]))
        outputs.append(out.sequences[0, ids.shape[1]:].tolist())
    return gaps, outputs


@pytest.mark.parametrize("arch", ARCHS)
def test_every_arch_reloads_with_transformers_and_generates_varied_text(made: dict[str, str], arch: str) -> None:
    config = _json(made[arch], "config.json")
    assert config["model_type"] == arch and config["num_hidden_layers"] == 2 and config["vocab_size"] == 1024
    gaps, outputs = _greedy(made[arch])
    assert all(len(ids) == NUM_NEW_TOKENS for ids in outputs)
    assert sum(gap < MIN_GAP for gap in gaps) <= 0.02 * len(gaps), sorted(gaps)[:5]
    assert all(len(set(ids)) >= 8 for ids in outputs), outputs  # not one token repeated forever


def test_arch_specific_weights_are_non_trivial(made: dict[str, str]) -> None:
    qwen2 = _tensors(made["qwen2"])
    assert qwen2["model.layers.0.self_attn.q_proj.bias"].abs().min() > 0
    qwen3 = _tensors(made["qwen3"])
    q_norm = qwen3["model.layers.0.self_attn.q_norm.weight"]
    assert q_norm.shape == (16,) and 0.01 < float(q_norm.std()) < 0.5 and not torch.allclose(q_norm, torch.ones(16))
    assert not torch.allclose(qwen3["model.norm.weight"], torch.ones(64))
    mixtral = _tensors(made["mixtral"])
    assert mixtral["model.layers.1.block_sparse_moe.experts.3.w1.weight"].shape == (128, 64)
    qwen2_moe = _tensors(made["qwen2_moe"])
    assert qwen2_moe["model.layers.1.mlp.shared_expert_gate.weight"].shape == (1, 64)
    assert qwen2_moe["model.layers.1.mlp.experts.3.gate_proj.weight"].shape == (128, 64)
    for arch, norm_topk in (("qwen2_moe", False), ("qwen3_moe", True)):
        config = _json(made[arch], "config.json")
        assert (config["norm_topk_prob"], config["decoder_sparse_step"], config["mlp_only_layers"]) == (norm_topk, 1, [])
    generation = _json(made["llama"], "generation_config.json")
    assert generation["eos_token_id"] == [1, 3]


def test_same_seed_same_files_other_seed_other_weights(tmp_path, made: dict[str, str]) -> None:
    again = make_model("qwen3_moe", str(tmp_path / "again"), progress=False)
    assert _file_hashes(again) == _file_hashes(made["qwen3_moe"])
    other = make_model("qwen3_moe", str(tmp_path / "other"), seed=1, progress=False)
    assert not torch.equal(_tensors(other)["lm_head.weight"], _tensors(again)["lm_head.weight"])


def test_sharded_checkpoint_has_an_index_and_the_same_weights(tmp_path, made: dict[str, str]) -> None:
    path = make_model("qwen2_moe", str(tmp_path / "sharded"), max_shard_size="100KB", progress=False)
    index = _json(path, "model.safetensors.index.json")
    shards = {name for name in os.listdir(path) if name.endswith(".safetensors")}
    assert len(shards) > 1 and set(index["weight_map"].values()) == shards
    whole, split = _tensors(made["qwen2_moe"]), _tensors(path)
    assert whole.keys() == split.keys() == index["weight_map"].keys()
    assert all(torch.equal(whole[key], split[key]) for key in whole)


def test_bfloat16_path_builds_in_that_dtype(tmp_path) -> None:
    path = make_model("llama", str(tmp_path / "bf16"), num_layers=1, dtype="bfloat16", device="cpu", progress=False)
    assert {t.dtype for t in _tensors(path).values()} == {torch.bfloat16}
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    out = model.generate(torch.tensor([[0, 40, 50]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


def test_llama3_rope_scaling_and_tied_embeddings(tmp_path) -> None:
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 256}
    path = make_model("llama", str(tmp_path / "llama3"), rope_scaling=scaling, rope_theta=500000.0,
                      tie_word_embeddings=True, progress=False)
    config = _json(path, "config.json")
    assert config["rope_parameters"] == {**scaling, "rope_theta": 500000.0}
    assert "lm_head.weight" not in _tensors(path)
    gaps, outputs = _greedy(path)
    assert min(gaps) > MIN_GAP and all(len(set(ids)) >= 8 for ids in outputs)


def test_bad_arch_names_the_valid_ones(tmp_path) -> None:
    with pytest.raises(ValueError, match="qwen3_moe"):
        make_model("gpt2", str(tmp_path / "nope"), progress=False)


def test_failed_or_refused_make_leaves_no_partial_dir(tmp_path, made: dict[str, str]) -> None:
    with pytest.raises(Exception):
        make_model("llama", str(tmp_path / "broken"), hidden_size=65, progress=False)  # not divisible by heads
    assert os.listdir(tmp_path) == []
    with pytest.raises(FileExistsError):
        make_model("llama", made["llama"], progress=False)
    assert sorted(os.listdir(os.path.dirname(made["llama"]))) == sorted(ARCHS)


def test_cli_makes_what_the_flags_say(tmp_path) -> None:
    out = str(tmp_path / "cli")
    assert make.main(["--arch", "qwen3", "--out", out, "--layers", "1", "--hidden", "32", "--heads", "2",
                      "--kv-heads", "1", "--intermediate", "48", "--vocab", "1088", "--seed", "3"]) == 0
    config = _json(out, "config.json")
    assert (config["num_hidden_layers"], config["hidden_size"], config["head_dim"], config["vocab_size"]) == (1, 32, 16, 1088)


@pytest.mark.slow
def test_default_model_is_made_once_and_races_resolve(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LLM_CLUSTER_CACHE", str(tmp_path))
    script = "from cluster.models.make import ensure_default_model as e; print(e())"
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) for _ in range(2)]
    paths = {proc.communicate(timeout=120)[0].strip() for proc in procs}
    assert all(proc.returncode == 0 for proc in procs)
    assert paths == {make.default_model_dir()} == {str(tmp_path / "models" / "tiny-llama-v1")}
    assert os.listdir(tmp_path / "models") == ["tiny-llama-v1"]  # the loser's temp dir is gone
    assert make.ensure_default_model() == make.default_model_dir()


def test_default_model_loser_uses_the_winners_dir(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LLM_CLUSTER_CACHE", str(tmp_path))

    def winner_publishes_first(arch: str, out_dir: str, **kwargs: object) -> str:
        os.makedirs(out_dir)
        Path(out_dir, "config.json").write_text("{}")
        raise FileExistsError(out_dir)

    monkeypatch.setattr(make, "make_model", winner_publishes_first)
    assert make.ensure_default_model() == str(tmp_path / "models" / "tiny-llama-v1")


def test_importing_the_module_does_not_import_transformers() -> None:
    script = "import sys, cluster.models.make, cluster.models.tokenizer; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", script], check=True)
