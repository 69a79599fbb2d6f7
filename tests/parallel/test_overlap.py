"""Turn-taking of micro-batches and the grouped expert GEMM (single process)."""
from __future__ import annotations

import torch

from cluster.parallel.experts import expert_counts, expert_mlp
from cluster.parallel.overlap import interleave, run_sync


def _layers(name: str, log: list, num_layers: int):
    for layer in range(num_layers):
        log.append((name, layer, "attn"))
        yield  # all-reduce in flight
        log.append((name, layer, "mlp"))
        yield
    return name


def test_interleave_takes_turns_and_keeps_layer_order():
    log: list = []
    assert interleave([_layers("A", log, 2), _layers("B", log, 2)]) == ["A", "B"]
    assert log[:4] == [("A", 0, "attn"), ("B", 0, "attn"), ("A", 0, "mlp"), ("B", 0, "mlp")]
    # micro-batch A reaches every layer before B does (B may continue a sequence A started)
    for layer in range(2):
        assert log.index(("A", layer, "attn")) < log.index(("B", layer, "attn"))
    assert run_sync(_layers("C", [], 3)) == "C"


def test_grouped_gemm_matches_the_expert_loop():
    gen = torch.Generator().manual_seed(0)
    num_experts, hidden, inter = 4, 16, 8
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=gen)
    w2 = torch.randn(num_experts, hidden, inter, generator=gen)
    ids = torch.tensor([3, 0, 0, 3, 1, 3, 0])  # expert 2 gets nothing
    counts = expert_counts(ids, num_experts)
    assert counts.tolist() == [3, 1, 0, 3]
    rows = torch.randn(len(ids), hidden, generator=gen)[torch.argsort(ids, stable=True)]
    loop = expert_mlp(rows, counts, w13, w2, grouped=False)
    if hasattr(torch, "_grouped_mm"):
        assert torch.allclose(expert_mlp(rows, counts, w13, w2, grouped=True), loop, atol=1e-5)
    start = 0
    for expert, count in enumerate(counts.tolist()):
        gate, up = (rows[start : start + count] @ w13[expert].T).chunk(2, -1)
        assert torch.allclose(loop[start : start + count], (torch.nn.functional.silu(gate) * up) @ w2[expert].T)
        start += count


def _experts(num_experts=6, hidden=16, inter=8):
    from cluster.models.moe import StackedExperts
    from cluster.parallel.handles import TPGroup

    experts = StackedExperts(num_experts, hidden, inter, TPGroup.single(), TPGroup.single())
    gen = torch.Generator().manual_seed(1)
    experts.w13.data.copy_(torch.randn(experts.w13.shape, generator=gen))
    experts.w2.data.copy_(torch.randn(experts.w2.shape, generator=gen))
    return experts


def test_a_tokens_moe_output_and_load_ignore_the_padded_rows_beside_it():
    """A CUDA-graph bucket runs padded rows with the step's rows: a real row's output must not
    depend on them beyond GEMM rounding (an expert's GEMM has more rows), and while a graph's row
    mask is set only the real rows count towards the expert load."""
    experts = _experts()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(5, 16, generator=gen)
    ids = torch.tensor([[0, 3], [3, 5], [1, 0], [5, 4], [2, 3]])
    weights = torch.softmax(torch.randn(5, 2, generator=gen), -1)
    alone = experts(x[:3], ids[:3], weights[:3])
    counted_alone = experts.tokens_per_expert.clone()
    assert counted_alone.tolist() == [2, 1, 0, 2, 0, 1]
    # each token's output is its weighted experts' sum
    for t in range(3):
        want = sum(weights[t, j] * expert_mlp(x[t : t + 1], torch.eye(6, dtype=torch.int64)[ids[t, j]],
                                              experts.w13, experts.w2, grouped=False)[0] for j in range(2))
        assert torch.allclose(alone[t], want, atol=1e-5)

    experts.tokens_per_expert.zero_()
    experts.row_mask = torch.tensor([1, 1, 1, 0, 0])  # rows 3, 4 are a bucket's padding
    padded = experts(x, ids, weights)
    experts.row_mask = None
    assert torch.allclose(padded[:3], alone, atol=1e-5)
    assert torch.equal(experts.tokens_per_expert, counted_alone)
