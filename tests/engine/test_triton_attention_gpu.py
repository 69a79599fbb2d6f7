"""TritonAttention on a GPU at serving shapes (bf16), against TorchRefAttention in fp32.

Run on the GPU machine: `pytest -m gpu tests/engine/test_triton_attention_gpu.py`.
"""
import os

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("GPU TESTS NOT RUN: need CUDA and compiled (not interpreted) triton; "
                "run `pytest -m gpu` on the GPU machine", allow_module_level=True)

from benchmarks.attention import build_paged_batch  # noqa: E402
from cluster.engine.attention.base import AttentionMetadata  # noqa: E402
from cluster.engine.attention.torch_ref import TorchRefAttention  # noqa: E402
from cluster.engine.attention.triton import TritonAttention  # noqa: E402


def _check(seqs, *, num_heads=32, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16, num_kv_splits=None,
           num_pad_tokens=0, block_size=16):
    torch.manual_seed(len(seqs) * 1000 + head_dim)
    batch = build_paged_batch(seqs, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                              block_size=block_size, dtype=dtype, device="cuda", num_pad_tokens=num_pad_tokens)
    scale = head_dim ** -0.5
    f32 = [t.float() for t in (batch.q, batch.k, batch.v, batch.k_cache, batch.v_cache)]
    ref = TorchRefAttention().forward(*f32, batch.meta, scale)
    out = TritonAttention(num_kv_splits=num_kv_splits).forward(
        batch.q, batch.k, batch.v, batch.k_cache, batch.v_cache, batch.meta, scale)
    torch.cuda.synchronize()
    n = batch.num_real_tokens
    assert torch.equal(batch.k_cache.float().nan_to_num(7.0), f32[3].nan_to_num(7.0))
    _assert_close(out[:n].float(), ref[:n], dtype)


def _assert_close(out, ref, dtype):
    assert not out.isnan().any()
    tol = 1e-3 if dtype == torch.float32 else 3e-2
    rel = (out - ref).norm() / ref.norm()
    assert rel < tol / 3, f"relative error {rel:.2e}"
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)


MIXED = [(0, 1500), (3000, 700), (4000, 1), (0, 1), (8191, 3), (129, 128), (2047, 1)] + [(500, 1)] * 20


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("num_kv_heads", [8, 32])
def test_mixed_batch_bf16(head_dim, num_kv_heads):
    _check(MIXED, num_kv_heads=num_kv_heads, head_dim=head_dim, num_pad_tokens=7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_mixed_batch_other_dtypes(dtype):
    _check(MIXED[:4], dtype=dtype)


@pytest.mark.parametrize("ctx", [1024, 8192, 32768])
def test_batch1_decode_split_kv(ctx):
    _check([(ctx - 1, 1)])


def test_forced_splits_with_spec_decode_and_gqa8():
    _check([(5000, 2), (70, 1), (2000, 2)], num_heads=64, num_kv_heads=8, num_kv_splits=16)


def test_block_size_32_and_64_heads_per_kv_group():
    _check([(0, 300), (900, 1)], num_heads=64, num_kv_heads=4, block_size=32)


def test_cuda_graph_decode_replay():
    """Capture one padded decode step with upper bounds, then replay it on new contents."""
    torch.manual_seed(0)
    head_dim, scale = 128, 128 ** -0.5
    seqs = [(900, 1), (3000, 1), (17, 1)]
    batch = build_paged_batch(seqs, num_heads=32, num_kv_heads=8, head_dim=head_dim, block_size=16,
                              dtype=torch.bfloat16, device="cuda", num_pad_tokens=5)
    meta = batch.meta
    graph_meta = AttentionMetadata(
        query_start_loc=meta.query_start_loc, seq_lens=meta.seq_lens, block_tables=meta.block_tables,
        slot_mapping=meta.slot_mapping, max_query_len=1, max_seq_len=8192,
        query_start_loc_cpu=[], seq_lens_cpu=[])
    backend = TritonAttention()
    args = (batch.q, batch.k, batch.v, batch.k_cache, batch.v_cache, graph_meta, scale)
    backend.forward(*args)  # compile before capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = backend.forward(*args)
    for _ in range(2):
        batch.q.copy_(torch.randn_like(batch.q))
        batch.k.copy_(torch.randn_like(batch.k))
        graph.replay()
        torch.cuda.synchronize()
        f32 = [t.float() for t in (batch.q, batch.k, batch.v, batch.k_cache, batch.v_cache)]
        ref = TorchRefAttention().forward(*f32, meta, scale)
        n = batch.num_real_tokens
        _assert_close(out[:n].float(), ref[:n], torch.bfloat16)
