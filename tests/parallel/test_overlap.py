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
