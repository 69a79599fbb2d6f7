"""Load a Hugging Face safetensors checkpoint into a model, shard by shard.

  (1) find the files: `model.safetensors.index.json` (sharded) or every `*.safetensors`;
  (2) for each stored tensor, map its HF name to one of our parameters and a
      shard id (q/k/v into qkv_proj, gate/up into gate_up_proj, expert j into
      the stacked expert weights) or skip it (another pipeline stage's layer,
      another rank's expert, a tied lm_head);
  (3) hand the lazy safetensors slice to the parameter's `weight_loader`, which
      reads only its own shard;
  (4) fail if any parameter was never loaded, naming it.
"""
from __future__ import annotations

import json
import os
import re

from tqdm.auto import tqdm

_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_EXPERT = re.compile(r"\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight$")
_EXPERT_PART = {"gate_proj": ("w13", 0), "w1": ("w13", 0), "up_proj": ("w13", 1), "w3": ("w13", 1), "down_proj": ("w2", None), "w2": ("w2", None)}
_STACKED = [(".q_proj.", ".qkv_proj.", "q"), (".k_proj.", ".qkv_proj.", "k"), (".v_proj.", ".qkv_proj.", "v"),
            (".gate_proj.", ".gate_up_proj.", 0), (".up_proj.", ".gate_up_proj.", 1)]


class CheckpointError(ValueError):
    pass


def checkpoint_files(model_dir: str) -> list[str]:
    index = os.path.join(model_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        missing = [n for n in names if not os.path.isfile(os.path.join(model_dir, n))]
        if missing:
            raise CheckpointError(f"{model_dir}: shard(s) listed in model.safetensors.index.json are missing: {', '.join(missing)}")
        return [os.path.join(model_dir, n) for n in names]
    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not files:
        raise CheckpointError(f"{model_dir}: no *.safetensors weights found")
    return [os.path.join(model_dir, f) for f in files]


def map_name(hf_name: str) -> tuple[str, object]:
    """HF tensor name -> (our parameter name, shard id or None)."""
    name = hf_name.replace(".block_sparse_moe.", ".mlp.")
    expert = _EXPERT.search(name)
    if expert:
        expert_id, part = int(expert.group(1)), expert.group(2)
        target, half = _EXPERT_PART[part]
        shard = expert_id if half is None else (expert_id, half)
        return name[: expert.start()] + f".mlp.experts.{target}", shard
    for old, new, shard in _STACKED:
        if old in name:
            return name.replace(old, new), shard
    return name, None


def load_weights(model, model_dir: str, progress: bool = True) -> None:
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    layer_range = model.model.layer_range
    from safetensors import safe_open

    files = checkpoint_files(model_dir)
    for path in tqdm(files, desc="loading weights", unit="file", disable=not progress or len(files) < 2):
        try:
            handle = safe_open(path, framework="pt", device="cpu")
        except Exception as exc:  # safetensors raises its own error types for truncated/corrupt headers
            raise CheckpointError(f"{path}: cannot read safetensors file ({exc})") from None
        with handle as f:
            for hf_name in f.keys():
                _load_one(model, params, loaded, layer_range, f, hf_name, path)
    missing = sorted(set(params) - loaded)
    if missing:
        raise CheckpointError(f"{model_dir}: checkpoint has no weights for {len(missing)} parameter(s): {', '.join(missing[:8])}")


def _load_one(model, params, loaded, layer_range, f, hf_name: str, path: str) -> None:
    if "rotary_emb" in hf_name:
        return
    layer = _LAYER.match(hf_name)
    if layer and int(layer.group(1)) not in layer_range:
        return
    if hf_name == "lm_head.weight" and model.cfg.tie_word_embeddings:
        return
    name, shard = map_name(hf_name)
    if name not in params:
        if name.startswith(("lm_head.", "model.embed_tokens.", "model.norm.")):
            return  # a pipeline stage that does not own them
        raise CheckpointError(f"{path}: tensor {hf_name!r} does not belong to a {model.cfg.family} model")
    param = params[name]
    if isinstance(shard, tuple) or (name.endswith("experts.w2") and shard is not None):
        owner = model.get_submodule(name.rsplit(".", 1)[0])
        if not owner.owns(shard[0] if isinstance(shard, tuple) else shard):
            loaded.add(name)
            return
    try:
        source = f.get_slice(hf_name)
        param.weight_loader(param, source, shard)
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot load {hf_name!r}: {exc}") from None
    loaded.add(name)
