"""Random checkpoints in true Hugging Face format, made locally (nothing is downloaded).

`make_model(arch, out_dir, ...)` goes through five steps:

1. Tokenizer: a byte-level BPE is trained on `data/corpus.txt` with `tokenizers`
   (once per process, deterministic), given Llama-3 / ChatML special tokens, a
   BOS-adding post-processor and a ChatML chat template.
2. Config: transformers' own config class for `arch`, filled from the arguments
   (RoPE goes in `rope_parameters`, the transformers 5 spelling; MoE archs make
   every layer sparse).
3. Model: transformers' own model class, built directly on `device` in `dtype`
   with transformers' init switched off, then every parameter is filled in place
   from one seeded generator on that device (scheme below).
4. Save: `save_pretrained` for model (sharded with an index when
   `max_shard_size` is given), tokenizer and generation config, into a temp dir
   beside `out_dir`.
5. Publish: the temp dir is renamed onto `out_dir` (atomic), so a crash never
   leaves half a checkpoint and of two racing makers exactly one wins.

Init scheme (why not transformers' N(0, 0.02)): parity tests compare our engine
with transformers token-for-token under greedy decoding. With std 0.02 a tiny
model's logits have std ~0.16, top-2 gaps are often < 1e-3 and any change of
summation order flips the argmax; the residual stream is also dominated by the
token embedding, so generations loop. With `initializer_range=None` we instead
draw every matrix from N(0, 1/fan_in) (activations stay O(1) at any width, in
bf16 too), embeddings from N(0, 1), the LM head from N(0, (LOGIT_STD)^2/hidden)
(logit std ~LOGIT_STD), RMSNorm weights (q/k norms too) from 1 + 0.1*N(0, 1) and
biases from N(0, 0.2^2). Tied embeddings take the LM head's std and the final
norm weight becomes N(0, 1) (see `_param_scale` for why). Measured over 3 seeds x
6 prompts x 32 greedy steps per arch: 0-1 of 576 top-2 gaps below 1e-3 (median
~0.85), against 6-15 (median ~0.035) with std 0.02; tests/models/test_make.py
keeps checking it. A float `initializer_range` draws every matrix and embedding
from N(0, initializer_range^2) instead (norms and biases as above).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any

ARCHS = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe")
SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>", "<|pad|>")
BOS, EOS, IM_START, IM_END, PAD = SPECIAL_TOKENS
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{ raise_exception('Unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LOGIT_STD = 4.0  # std of the random logits with the default init: wide top-2 gaps, argmax unchanged by scale
NORM_WEIGHT_STD = 0.1  # RMSNorm weights are 1 + this * N(0, 1)
BIAS_STD = 0.2  # qkv biases (qwen2, qwen2_moe) are N(0, this^2)
VOCAB_MULTIPLE = 64  # default model vocab: tokenizer size rounded up to a multiple of this
CORPUS_PATH = os.path.join(os.path.dirname(__file__), "data", "corpus.txt")
DEFAULT_MODEL_NAME = "tiny-llama-v1"  # bump the version whenever make_model's output changes


@functools.lru_cache(maxsize=4)
def trained_tokenizer_json(vocab_size: int) -> str:
    """Step 1: the BPE tokenizer as tokenizer.json text (trained once per process per size)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train([CORPUS_PATH], trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)],
    )
    return tokenizer.to_str()


def _save_tokenizer(out_dir: str, tokenizer_vocab_size: int, max_position_embeddings: int) -> Any:
    """Step 1 (save): tokenizer.json + tokenizer_config.json + chat_template.jinja; returns the HF tokenizer."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(trained_tokenizer_json(tokenizer_vocab_size))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD, chat_template=CHAT_TEMPLATE,
        extra_special_tokens=[IM_START, IM_END],
        clean_up_tokenization_spaces=False, model_max_length=max_position_embeddings,
    )
    tokenizer.save_pretrained(out_dir)
    return tokenizer


@dataclass(frozen=True)
class ModelSpec:
    """What make_model builds (its keyword arguments, less where and how loudly)."""

    arch: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int | None  # None: tokenizer size rounded up to VOCAB_MULTIPLE
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int | None  # None: intermediate_size
    shared_expert_intermediate_size: int | None  # None: intermediate_size (qwen2_moe)
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope_theta: float
    rope_scaling: dict | None  # e.g. {"rope_type": "llama3", "factor": 8.0, ...}
    seed: int
    dtype: str  # float32 | bfloat16 | float16
    device: str  # where the weights are built and initialised: cpu, cuda, cuda:1, ...
    max_shard_size: str | None  # e.g. "5GB"; None: one model.safetensors
    initializer_range: float | None  # None: the fan-in scheme of the module docstring
    tokenizer_vocab_size: int
    head_dim: int | None  # None: hidden_size / num_heads

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; valid: {', '.join(ARCHS)}")


def _arch_kwargs(spec: ModelSpec) -> dict[str, object]:
    """Step 2: the config fields that differ between archs."""
    head_dim = spec.head_dim or spec.hidden_size // spec.num_heads
    moe = {"num_experts": spec.num_experts, "num_experts_per_tok": spec.num_experts_per_tok,
           "moe_intermediate_size": spec.moe_intermediate_size or spec.intermediate_size,
           "decoder_sparse_step": 1, "mlp_only_layers": []}
    shared_size = spec.shared_expert_intermediate_size or spec.intermediate_size
    explicit = {"head_dim": head_dim} if spec.head_dim else {}
    return {
        "llama": explicit,
        "mistral": {"sliding_window": None, **explicit},
        "qwen2": explicit,
        "qwen3": {"head_dim": head_dim},
        "mixtral": {"num_local_experts": spec.num_experts, "num_experts_per_tok": spec.num_experts_per_tok,
                    "sliding_window": None, "router_jitter_noise": 0.0},
        "qwen2_moe": {**moe, "shared_expert_intermediate_size": shared_size, "norm_topk_prob": False},
        "qwen3_moe": {**moe, "head_dim": head_dim, "norm_topk_prob": True},
    }[spec.arch]


def _rope_kwargs(config_cls: type, rope_theta: float, rope_scaling: dict | None) -> dict[str, object]:
    """Step 2: RoPE as this transformers version spells it (5.x: one `rope_parameters` dict)."""
    scaling = dict(rope_scaling or {})
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    if "rope_parameters" in getattr(config_cls, "__dataclass_fields__", {}):
        return {"rope_parameters": {"rope_type": "default", "rope_theta": rope_theta, **scaling}}
    return {"rope_theta": rope_theta, "rope_scaling": scaling or None}  # transformers 4 spelling


def build_config(spec: ModelSpec, vocab_size: int, special_ids: dict[str, int]) -> Any:
    """Step 2: transformers' config for `spec`."""
    from transformers import CONFIG_MAPPING, AutoConfig

    return AutoConfig.for_model(
        spec.arch, vocab_size=vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings, tie_word_embeddings=spec.tie_word_embeddings,
        initializer_range=spec.initializer_range or 1.0 / math.sqrt(spec.hidden_size),
        bos_token_id=special_ids[BOS], eos_token_id=special_ids[EOS], pad_token_id=special_ids[PAD],
        **_rope_kwargs(CONFIG_MAPPING[spec.arch], spec.rope_theta, spec.rope_scaling), **_arch_kwargs(spec),
    )


def _param_scale(name: str, param: Any, config: Any, initializer_range: float | None) -> tuple[float, float]:
    """Step 3: (mean, std) one parameter is drawn with (the scheme in the module docstring)."""
    # Tied: logit(j) = e_j . (w * norm(h)) and h holds the current token's own e, so with w ~ 1 the term
    # sum_i w_i e_i^2 > 0 lifts the current token and greedy decoding repeats it. A final norm weight
    # w ~ N(0, 1) (random signs) gives that term zero mean; the embedding then takes the LM head's std.
    tied_head = config.tie_word_embeddings and initializer_range is None
    if name.endswith(".bias"):
        return 0.0, BIAS_STD
    if param.dim() == 1:  # RMSNorm weights, q/k norms included
        return (0.0, 1.0) if tied_head and name == "model.norm.weight" else (1.0, NORM_WEIGHT_STD)
    if initializer_range is not None:
        return 0.0, initializer_range
    if name.endswith("embed_tokens.weight") and not tied_head:
        return 0.0, 1.0
    if name.startswith("lm_head") or name.endswith("embed_tokens.weight"):
        return 0.0, LOGIT_STD / math.sqrt(config.hidden_size)
    return 0.0, 1.0 / math.sqrt(param.shape[-1])  # fan_in: Linear (out, in) and fused experts (E, out, in) alike


def init_weights(model: Any, seed: int, initializer_range: float | None, progress: bool) -> None:
    """Step 3: fill every parameter in place from one generator on the parameters' device."""
    import torch
    from tqdm import tqdm

    params = list(model.named_parameters())  # shared (tied) parameters appear once
    generator = torch.Generator(device=params[0][1].device).manual_seed(seed)
    with torch.no_grad():
        for name, param in tqdm(params, desc="init weights", unit="tensor", disable=not progress, leave=False):
            mean, std = _param_scale(name, param, model.config, initializer_range)
            param.normal_(mean, std, generator=generator)


def _build_model(config: Any, dtype: str, device: str) -> Any:
    """Step 3: the model built on `device` in `dtype`, transformers' own (slow) init skipped."""
    import torch
    from transformers import AutoModelForCausalLM, initialization

    with torch.device(device), initialization.no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.tie_weights()  # no_init_weights also skipped the tying that init_weights does
    return model


def _save_model(model: Any, out_dir: str, max_shard_size: str | None, special_ids: dict[str, int]) -> None:
    """Step 4: config.json, generation_config.json and the safetensors (sharded with an index if asked)."""
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(
        bos_token_id=special_ids[BOS], eos_token_id=[special_ids[EOS], special_ids[IM_END]],
        pad_token_id=special_ids[PAD],
    )
    model.save_pretrained(out_dir, **({"max_shard_size": max_shard_size} if max_shard_size else {}))


def publish(tmp_dir: str, out_dir: str) -> None:
    """Step 5: rename `tmp_dir` onto `out_dir`; FileExistsError (tmp removed) if `out_dir` is taken."""
    try:
        os.rename(tmp_dir, out_dir)  # POSIX: atomic; replaces only a missing or empty directory
    except OSError as err:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise FileExistsError(f"{out_dir} already exists and is not empty") from err


@contextlib.contextmanager
def _transformers_progress(progress: bool) -> Iterator[None]:
    """transformers' own progress bars (shard writing) follow `progress`, then are restored."""
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    if not progress:
        logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()


def _make_into(spec: ModelSpec, tmp_dir: str, progress: bool) -> None:
    """Steps 1-4 into `tmp_dir`, one progress-bar step each."""
    from tqdm import tqdm

    with tqdm(total=4, desc=f"make {spec.arch}", unit="step", disable=not progress) as stages, \
            _transformers_progress(progress):
        hf_tokenizer = _save_tokenizer(tmp_dir, spec.tokenizer_vocab_size, spec.max_position_embeddings)
        special_ids = {token: hf_tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
        vocab_size = spec.vocab_size or -(-len(hf_tokenizer) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
        stages.update(1)
        model = _build_model(build_config(spec, vocab_size, special_ids), spec.dtype, spec.device)
        stages.update(1)
        init_weights(model, spec.seed, spec.initializer_range, progress)
        stages.update(1)
        _save_model(model, tmp_dir, spec.max_shard_size, special_ids)
        stages.update(1)


def make_model(arch: str, out_dir: str, *, num_layers: int = 2, hidden_size: int = 64, num_heads: int = 4,
               num_kv_heads: int = 2, intermediate_size: int = 128, vocab_size: int | None = None,
               num_experts: int = 4, num_experts_per_tok: int = 2, moe_intermediate_size: int | None = None,
               shared_expert_intermediate_size: int | None = None, max_position_embeddings: int = 2048,
               tie_word_embeddings: bool = False, rope_theta: float = 10000.0, rope_scaling: dict | None = None,
               seed: int = 0, dtype: str = "float32", device: str = "cpu", max_shard_size: str | None = None,
               initializer_range: float | None = None, tokenizer_vocab_size: int = 1024,
               head_dim: int | None = None, progress: bool = True) -> str:
    """Make a random `arch` checkpoint at `out_dir` (steps in the module docstring); returns its path.

    Raises ValueError for an unknown arch and FileExistsError if `out_dir` exists and is not empty.
    Not thread-safe: transformers' init switch-off patches torch.nn.init for the build's duration.
    """
    arguments = locals()
    spec = ModelSpec(**{field.name: arguments[field.name] for field in fields(ModelSpec)})
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.tmp-", dir=parent)
    try:
        _make_into(spec, tmp_dir, progress)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    publish(tmp_dir, out_dir)
    return out_dir


def make_llama3_8b_shape(out_dir: str, num_layers: int = 32, device: str = "cuda", rank_of_tp: int = 1) -> str:
    """A random checkpoint of Llama-3-8B's shape (bf16) for the GPU benchmarks; fewer layers for short runs.

    `rank_of_tp` > 1: the part one rank of that tensor-parallel size holds (heads, KV heads, MLP width and
    vocabulary divided, head_dim kept at 128), so one GPU times a TP rank's compute without its collectives.
    """
    tp = rank_of_tp
    return make_model("llama", out_dir, num_layers=num_layers, hidden_size=4096, num_heads=32 // tp,
                      num_kv_heads=max(1, 8 // tp), head_dim=128, intermediate_size=14336 // tp,
                      vocab_size=128256 // tp, max_position_embeddings=8192, rope_theta=500000.0,
                      dtype="bfloat16", device=device, max_shard_size="5GB", progress=False)


def default_model_dir() -> str:
    """Where the shared tiny llama lives: <cache>/models/tiny-llama-v1."""
    from cluster.config import env_cache_dir

    return os.path.join(env_cache_dir(), "models", DEFAULT_MODEL_NAME)


def ensure_default_model() -> str:
    """The tiny llama (2 layers, hidden 64), made on first use; a racing loser uses the winner's dir."""
    out_dir = default_model_dir()
    if os.path.exists(os.path.join(out_dir, "config.json")):
        return out_dir
    try:
        make_model("llama", out_dir, progress=False)
    except FileExistsError:
        pass  # another process published first; its checkpoint is the same (same args, same seed)
    return out_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `make-model` subcommand's flags."""
    parser.add_argument("--arch", required=True, choices=ARCHS)
    parser.add_argument("--out", required=True, help="checkpoint directory to create")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=128)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--experts-per-tok", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=None, help="model vocab (default: tokenizer size rounded up to 64)")
    parser.add_argument("--max-position", type=int, default=2048)
    parser.add_argument("--tie-embeddings", action="store_true")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shard-size", default=None, help="e.g. 5GB; default: one file")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> str:
    """Make the checkpoint the parsed flags describe; prints and returns its path."""
    out_dir = make_model(
        args.arch, args.out, num_layers=args.layers, hidden_size=args.hidden, num_heads=args.heads,
        num_kv_heads=args.kv_heads, intermediate_size=args.intermediate, num_experts=args.experts,
        num_experts_per_tok=args.experts_per_tok, vocab_size=args.vocab, max_position_embeddings=args.max_position,
        tie_word_embeddings=args.tie_embeddings, dtype=args.dtype, device=args.device,
        max_shard_size=args.shard_size, seed=args.seed,
    )
    print(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    """`llm-cluster make-model ...` as a standalone entry point."""
    parser = argparse.ArgumentParser(prog="llm-cluster make-model", description="Make a random HF checkpoint.")
    add_arguments(parser)
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
