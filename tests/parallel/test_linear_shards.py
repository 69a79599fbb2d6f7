"""Each rank's shard of every tensor-parallel weight is exactly its slice of the full weight,
read from the safetensors slice without ever materialising the whole tensor."""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cluster.models.moe import StackedExperts
from cluster.models.registry import build_model
from cluster.parallel.handles import TPGroup
from cluster.parallel.linear import (ColumnParallelLinear, MergedColumnParallelLinear, ParallelLMHead, QKVParallelLinear,
                                     RowParallelLinear, VocabParallelEmbedding)

HIDDEN, HEAD_DIM, NUM_HEADS = 6, 2, 8


class RecordingSlice:
    """A safetensors slice that remembers how many elements each read returned."""

    def __init__(self, inner):
        self.inner = inner
        self.numels: list[int] = []

    def get_shape(self):
        return self.inner.get_shape()

    def __getitem__(self, index):
        out = self.inner[index]
        self.numels.append(out.numel())
        return out


@pytest.fixture()
def weights(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "w": torch.randn(8, HIDDEN, generator=gen),
        "b": torch.randn(8, generator=gen),
        "gate": torch.randn(12, HIDDEN, generator=gen),
        "up": torch.randn(12, HIDDEN, generator=gen),
        "q": torch.randn(NUM_HEADS * HEAD_DIM, HIDDEN, generator=gen),
        "k2": torch.randn(2 * HEAD_DIM, HIDDEN, generator=gen),
        "v2": torch.randn(2 * HEAD_DIM, HIDDEN, generator=gen),
        "k1": torch.randn(1 * HEAD_DIM, HIDDEN, generator=gen),
        "v1": torch.randn(1 * HEAD_DIM, HIDDEN, generator=gen),
        "emb": torch.randn(10, HIDDEN, generator=gen),
        **{f"e{j}.{part}": torch.randn(*(shape), generator=gen) for j in range(4)
           for part, shape in (("gate", (12, HIDDEN)), ("up", (12, HIDDEN)), ("down", (HIDDEN, 12)))},
    }
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path))
    with safe_open(str(path), framework="pt") as f:
        yield tensors, f


def _load(param, f, name, shard_id=None) -> RecordingSlice:
    source = RecordingSlice(f.get_slice(name))
    param.weight_loader(param, source, shard_id)
    return source


def _assert_only_shard_read(source: RecordingSlice, param_numel: int) -> None:
    assert source.numels and max(source.numels) <= param_numel, "a rank read more than its shard"


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_column_and_row_shards(weights, tp):
    full, f = weights
    for rank in range(tp):
        group = TPGroup(rank, tp)
        col = ColumnParallelLinear(HIDDEN, 8, group, bias=True)
        _assert_only_shard_read(_load(col.weight, f, "w"), col.weight.numel())
        _load(col.bias, f, "b")
        rows = slice(rank * 8 // tp, (rank + 1) * 8 // tp)
        assert torch.equal(col.weight, full["w"][rows]) and torch.equal(col.bias, full["b"][rows])
        if HIDDEN % tp == 0:
            row = RowParallelLinear(HIDDEN, 8, group)
            _assert_only_shard_read(_load(row.weight, f, "w"), row.weight.numel())
            cols = slice(rank * HIDDEN // tp, (rank + 1) * HIDDEN // tp)
            assert torch.equal(row.weight, full["w"][:, cols])


@pytest.mark.parametrize("tp", [2, 4])
def test_merged_gate_up_shards(weights, tp):
    full, f = weights
    for rank in range(tp):
        merged = MergedColumnParallelLinear(HIDDEN, [12, 12], TPGroup(rank, tp))
        _load(merged.weight, f, "gate", 0)
        _load(merged.weight, f, "up", 1)
        rows = slice(rank * 12 // tp, (rank + 1) * 12 // tp)
        assert torch.equal(merged.weight, torch.cat([full["gate"][rows], full["up"][rows]]))


@pytest.mark.parametrize("num_kv_heads,tp", [(2, 1), (2, 2), (2, 4), (1, 2), (1, 4)])
def test_qkv_shards_split_or_replicate_kv_heads(weights, num_kv_heads, tp):
    full, f = weights
    group_size = NUM_HEADS // num_kv_heads  # query heads per kv head
    for rank in range(tp):
        qkv = QKVParallelLinear(HIDDEN, HEAD_DIM, NUM_HEADS, num_kv_heads, TPGroup(rank, tp))
        for shard_id in ("q", "k", "v"):
            name = shard_id if shard_id == "q" else f"{shard_id}{num_kv_heads}"
            _assert_only_shard_read(_load(qkv.weight, f, name, shard_id), qkv.weight.numel())
        q_heads = list(range(rank * NUM_HEADS // tp, (rank + 1) * NUM_HEADS // tp))
        kv_heads = sorted({h // group_size for h in q_heads})  # the kv heads this rank's queries attend with
        assert qkv.num_kv_heads == len(kv_heads) == max(1, num_kv_heads // tp)
        rows = lambda heads: torch.cat([torch.arange(h * HEAD_DIM, (h + 1) * HEAD_DIM) for h in heads])  # noqa: E731
        expected = torch.cat([full["q"][rows(q_heads)], full[f"k{num_kv_heads}"][rows(kv_heads)],
                              full[f"v{num_kv_heads}"][rows(kv_heads)]])
        assert torch.equal(qkv.weight, expected)


def test_vocab_shards_pad_the_last_rank(weights):
    full, f = weights
    shards = []
    for rank in range(4):  # 10 rows over 4 ranks: 3, 3, 3, 1 (+2 zero rows)
        emb = VocabParallelEmbedding(10, HIDDEN, TPGroup(rank, 4))
        _assert_only_shard_read(_load(emb.weight, f, "emb"), emb.weight.numel())
        shards.append(emb.weight.detach())
    assert torch.equal(torch.cat(shards)[:10], full["emb"])
    assert torch.count_nonzero(shards[-1][1:]) == 0
    head = ParallelLMHead(10, HIDDEN, TPGroup())
    _load(head.weight, f, "emb")
    x = torch.randn(3, HIDDEN)
    assert torch.allclose(head.logits(x), x @ full["emb"].T)


@pytest.mark.parametrize("mode", ["tensor", "expert"])
def test_expert_shards(weights, mode):
    full, f = weights
    for rank in range(2):
        group = TPGroup(rank, 2)
        ep, tp = (group, TPGroup()) if mode == "expert" else (TPGroup(), group)
        experts = StackedExperts(4, HIDDEN, 12, ep, tp)
        for j in range(4):
            if experts.owns(j):
                _load(experts.w13, f, f"e{j}.gate", (j, 0))
                _load(experts.w13, f, f"e{j}.up", (j, 1))
                _assert_only_shard_read(_load(experts.w2, f, f"e{j}.down", j), experts.w2[0].numel())
        owned = range(2 * rank, 2 * rank + 2) if mode == "expert" else range(4)
        cols = slice(0, 12) if mode == "expert" else slice(6 * rank, 6 * rank + 6)
        for local, j in enumerate(owned):
            assert torch.equal(experts.w13[local], torch.cat([full[f"e{j}.gate"][cols], full[f"e{j}.up"][cols]]))
            assert torch.equal(experts.w2[local], full[f"e{j}.down"][:, cols])


@pytest.mark.parametrize("name,expert_parallel", [("llama_tied_mqa_rope3_sharded", False), ("qwen2_moe", False), ("mixtral", True)])
def test_whole_model_shards_match_the_full_model(checkpoint_dir, name, expert_parallel):
    """Loading a real checkpoint as rank r of 2 (and as a pipeline stage) gives rank r's slices."""
    from cluster.models.hf_config import load_arch_config

    path = checkpoint_dir(name)
    arch = load_arch_config(path)
    full = dict(build_model(path, torch.float32, torch.device("cpu"), 256, progress=False).named_parameters())
    for stage, layers in enumerate([range(0, 1), range(1, 2)]):
        for rank in range(2):
            group = TPGroup(rank, 2)
            model = build_model(path, torch.float32, torch.device("cpu"), 256, tp=group,
                                ep=group if expert_parallel else None, layer_range=layers, progress=False)
            params = dict(model.named_parameters())
            # stage 0 embeds and holds the LM head (tied: the same weight), stage 1 the final norm
            owned = {"model.embed_tokens.weight", "lm_head.weight"} & set(full) if stage == 0 else {"model.norm.weight"}
            assert {n for n in params if not n.startswith(f"model.layers.{layers.start}.")} == owned
            for pname, param in params.items():
                assert torch.equal(param, _expected(pname, full[pname], rank, 2, arch, expert_parallel)), pname


def _expected(name: str, ref: torch.Tensor, rank: int, tp: int, arch, expert_parallel: bool) -> torch.Tensor:
    """Rank `rank`'s slice of the full parameter `ref`."""
    if "qkv_proj" in name:
        q_size, kv_size = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
        q, k, v = ref.split([q_size, kv_size, kv_size])
        kv_head = rank * arch.num_kv_heads // tp if tp > arch.num_kv_heads else None
        pick = (lambda t: t.chunk(tp)[rank]) if kv_head is None else (lambda t: t.chunk(arch.num_kv_heads)[kv_head])
        return torch.cat([q.chunk(tp)[rank], pick(k), pick(v)])
    if name.endswith("experts.w13") or name.endswith("experts.w2"):
        if expert_parallel:
            return ref.chunk(tp)[rank]
        if name.endswith("w2"):
            return ref.chunk(tp, 2)[rank]
        gate, up = ref.chunk(2, 1)
        return torch.cat([gate.chunk(tp, 1)[rank], up.chunk(tp, 1)[rank]], 1)
    if "gate_up_proj" in name:
        gate, up = ref.chunk(2)
        return torch.cat([gate.chunk(tp)[rank], up.chunk(tp)[rank]])
    if "o_proj" in name or "down_proj" in name:
        return ref.chunk(tp, 1)[rank]
    if "embed_tokens" in name or "lm_head" in name:
        rows = -(-ref.shape[0] // tp)
        shard = ref[rank * rows : (rank + 1) * rows]
        return torch.cat([shard, shard.new_zeros(rows - shard.shape[0], ref.shape[1])])
    return ref  # norms, router, shared expert gate: replicated
