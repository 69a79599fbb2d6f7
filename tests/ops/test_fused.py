"""The fused Triton kernels (cluster/ops/fused_triton.py) against the torch path of cluster/ops/fused.py.

Two sections:

1. `triton`: small shapes, run under the Triton interpreter on the CPU (or
   compiled on CUDA where this process has a GPU). The raw launchers are called
   directly, since on CPU the dispatch would pick the torch code.
   The interpreter casts fp32 -> bf16 by truncation, not round-to-nearest, so
   bf16 is checked there with a looser tolerance; fp32 and fp16 round as on a GPU.
2. `gpu`: bf16 at Llama-3-8B shapes on CUDA, exact where the roundings match,
   and the three kernels captured in a CUDA graph. Run with `pytest -m gpu`.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported

try:
    import triton
except ImportError:
    pytest.skip("TRITON NOT INSTALLED: fused kernels are untested (pip install triton)", allow_module_level=True)

from cluster.ops import fused  # noqa: E402
from cluster.ops import fused_triton as kernels  # noqa: E402
from cluster.models.layers import RMSNorm, RotaryEmbedding  # noqa: E402

_INTERPRETED = not isinstance(kernels._rms_norm_kernel, triton.runtime.jit.JITFunction)
DEVICE = "cpu" if _INTERPRETED else "cuda"
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.fail("triton was imported before TRITON_INTERPRET=1 was set and there is no GPU", pytrace=False)

_ON_GPU = torch.cuda.is_available() and not _INTERPRETED
gpu = pytest.mark.skipif(not _ON_GPU, reason="GPU TESTS NOT RUN: need CUDA and compiled (not interpreted) "
                                             "triton; run `pytest -m gpu` on the GPU machine")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
EPS = 1e-5


def _tol(dtype) -> dict:
    if dtype == torch.float32:
        return dict(atol=1e-5, rtol=1e-5)
    if dtype == torch.float16:
        return dict(atol=2e-3, rtol=2e-3)
    # bf16: 1 ulp = 2^-7 relative; truncating casts (interpreter) may cost ~3 of them.
    return dict(atol=5e-2, rtol=5e-2) if _INTERPRETED else dict(atol=2e-2, rtol=2e-2)


def _exact_rounding(dtype) -> bool:
    """Whether casts to dtype round to nearest here (not in the interpreter for bf16)."""
    return not (_INTERPRETED and dtype == torch.bfloat16)


def _qkv_views(num_tokens, num_q_heads, num_kv_heads, head_dim, dtype, device):
    """q, k as the model makes them: strided views into one [T, (Hq + 2 Hk) * D] projection."""
    qkv = torch.randn(num_tokens, (num_q_heads + 2 * num_kv_heads) * head_dim, dtype=dtype, device=device)
    q_size, kv_size = num_q_heads * head_dim, num_kv_heads * head_dim
    q, k, _ = qkv.split([q_size, kv_size, kv_size], dim=-1)
    return qkv, q.view(-1, num_q_heads, head_dim), k.view(-1, num_kv_heads, head_dim)


def _rotary_fp32(x, positions, rotary):
    """The exact rotation in fp32, rounded once to x's dtype."""
    cos, sin = rotary.cos[positions][:, None, :], rotary.sin[positions][:, None, :]
    xf = x.float()
    return (xf * cos + fused._rotate_half(xf) * sin).to(x.dtype)


# ---------------------------------------------------------------- 1. small shapes (interpreter on CPU)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 5, 33])
@pytest.mark.parametrize("hidden", [64, 300, 512])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_torch(dtype, num_tokens, hidden, with_residual):
    torch.manual_seed(num_tokens * 1000 + hidden)
    x = 3 * torch.randn(num_tokens, hidden, dtype=dtype, device=DEVICE)
    weight = (1 + 0.1 * torch.randn(hidden, device=DEVICE)).to(dtype)
    if not with_residual:
        torch.testing.assert_close(kernels.rms_norm_triton(x, weight, EPS),
                                   fused._rms_norm_torch(x, weight, EPS), **_tol(dtype))
        return
    residual = torch.randn(num_tokens, hidden, dtype=dtype, device=DEVICE)
    x_before, residual_before = x.clone(), residual.clone()
    out, new_residual = kernels.rms_norm_triton(x, weight, EPS, residual=residual)
    ref_out, ref_residual = fused._fused_add_rms_norm_torch(x, residual, weight, EPS)
    assert torch.equal(x, x_before) and torch.equal(residual, residual_before), "inputs must not change"
    if _exact_rounding(dtype):
        assert torch.equal(new_residual, ref_residual)
    torch.testing.assert_close(new_residual, ref_residual, **_tol(dtype))
    torch.testing.assert_close(out, ref_out, **_tol(dtype))
    if dtype == torch.float16:  # same roundings as torch (HF casts before the weight): rare 1-ulp flips only
        assert (out != ref_out).float().mean() < 0.02


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rms_norm_of_strided_heads(dtype):
    """q/k norms (Qwen3): [T, H, D] views into the qkv projection, one row per (token, head)."""
    torch.manual_seed(0)
    _, q, k = _qkv_views(5, 4, 2, 64, dtype, DEVICE)
    weight = (1 + 0.1 * torch.randn(64, device=DEVICE)).to(dtype)
    for x in (q, k):
        assert not x.is_contiguous()
        torch.testing.assert_close(kernels.rms_norm_triton(x, weight, EPS),
                                   fused._rms_norm_torch(x, weight, EPS), **_tol(dtype))


@pytest.mark.triton
def test_rms_norm_promotes_to_weight_dtype():
    torch.manual_seed(1)
    x = torch.randn(3, 128, dtype=torch.float16, device=DEVICE)
    weight = 1 + 0.1 * torch.randn(128, device=DEVICE)  # fp32, as torch would promote to
    out = kernels.rms_norm_triton(x, weight, EPS)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, fused._rms_norm_torch(x, weight, EPS), atol=1e-5, rtol=1e-5)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 5, 33])
@pytest.mark.parametrize("head_dim,num_q_heads,num_kv_heads", [(64, 4, 2), (128, 4, 1), (128, 3, 3), (80, 4, 2)])
def test_rotary_matches_torch(dtype, num_tokens, head_dim, num_q_heads, num_kv_heads):
    torch.manual_seed(num_tokens * 100 + head_dim + num_kv_heads)
    rotary = RotaryEmbedding(head_dim, 4096, 500000.0, None).to(DEVICE)
    qkv, q, k = _qkv_views(num_tokens, num_q_heads, num_kv_heads, head_dim, dtype, DEVICE)
    positions = torch.randperm(4096, device=DEVICE)[:num_tokens]  # out of order, far apart
    ref_q, ref_k = fused._rotary_torch(q, k, positions, rotary.cos, rotary.sin)
    exact_q, exact_k = _rotary_fp32(q, positions, rotary), _rotary_fp32(k, positions, rotary)
    v_before = qkv[:, (num_q_heads + num_kv_heads) * head_dim:].clone()

    kernels.rotary_triton_(q, k, positions, rotary.cos, rotary.sin)

    assert torch.equal(qkv[:, (num_q_heads + num_kv_heads) * head_dim:], v_before), "v must be untouched"
    torch.testing.assert_close(q, ref_q, **_tol(dtype))
    torch.testing.assert_close(k, ref_k, **_tol(dtype))
    if _exact_rounding(dtype) and dtype != torch.float32:
        # fp32 math rounded once: within 1 ulp of the exactly rounded rotation (fp16: 2^-10 rel).
        torch.testing.assert_close(q, exact_q, atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(k, exact_k, atol=1e-3, rtol=1e-3)


@pytest.mark.triton
def test_rotary_other_strides_and_int32_positions():
    """Heads-major storage (token stride D, head stride T*D) and int32 positions."""
    torch.manual_seed(2)
    num_tokens, head_dim = 6, 64
    rotary = RotaryEmbedding(head_dim, 512, 10000.0, None).to(DEVICE)
    q = torch.randn(4, num_tokens, head_dim, device=DEVICE).transpose(0, 1)
    k = torch.randn(2, num_tokens, head_dim, device=DEVICE).transpose(0, 1)
    positions = torch.tensor([511, 0, 7, 3, 300, 7], dtype=torch.int32, device=DEVICE)
    ref_q, ref_k = fused._rotary_torch(q, k, positions.long(), rotary.cos, rotary.sin)
    kernels.rotary_triton_(q, k, positions, rotary.cos, rotary.sin)
    torch.testing.assert_close(q, ref_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k, ref_k, atol=1e-5, rtol=1e-5)


@pytest.mark.triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens", [1, 5, 33])
@pytest.mark.parametrize("intermediate", [64, 300, 1100])  # 1100 spans two column blocks
def test_silu_and_mul_matches_torch(dtype, num_tokens, intermediate):
    torch.manual_seed(num_tokens + intermediate)
    gate_up = 3 * torch.randn(num_tokens, 2 * intermediate, dtype=dtype, device=DEVICE)
    torch.testing.assert_close(kernels.silu_and_mul_triton(gate_up), fused._silu_and_mul_torch(gate_up),
                               **_tol(dtype))


@pytest.mark.triton
def test_silu_and_mul_strided_rows():
    torch.manual_seed(3)
    wide = torch.randn(5, 2 * 300 + 17, device=DEVICE)
    gate_up = wide[:, : 2 * 300]  # row stride 617
    torch.testing.assert_close(kernels.silu_and_mul_triton(gate_up), fused._silu_and_mul_torch(gate_up),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.triton
def test_empty_batch_launches_nothing():
    x = torch.empty(0, 64, device=DEVICE)
    weight = torch.ones(64, device=DEVICE)
    assert kernels.rms_norm_triton(x, weight, EPS).shape == (0, 64)
    out, residual = kernels.rms_norm_triton(x, weight, EPS, residual=x)
    assert out.shape == residual.shape == (0, 64)
    assert kernels.silu_and_mul_triton(torch.empty(0, 128, device=DEVICE)).shape == (0, 64)
    q, k = torch.empty(0, 4, 64, device=DEVICE), torch.empty(0, 2, 64, device=DEVICE)
    kernels.rotary_triton_(q, k, torch.empty(0, dtype=torch.long, device=DEVICE), torch.ones(8, 64), torch.ones(8, 64))


def test_cpu_dispatch_is_the_torch_code():
    """On CPU the public functions and the layers are the pre-kernel torch code, bit for bit."""
    torch.manual_seed(4)
    x, residual = torch.randn(5, 96), torch.randn(5, 96)
    norm = RMSNorm(96, EPS)
    norm.weight.data = 1 + 0.1 * torch.randn(96)
    assert not fused._use_triton(x)
    out, new_residual = norm(x, residual)
    assert torch.equal(new_residual, residual + x)
    assert torch.equal(out, norm(residual + x))
    assert torch.equal(norm(x), fused._rms_norm_torch(x, norm.weight, EPS))
    _, q, k = _qkv_views(5, 4, 2, 64, torch.float32, "cpu")
    q_before = q.clone()
    rotary = RotaryEmbedding(64, 64, 10000.0, None)
    positions = torch.tensor([3, 1, 60, 0, 2])
    rq, rk = rotary(positions, q, k)
    assert torch.equal(q, q_before), "the torch path returns new tensors"
    ref_q, ref_k = fused._rotary_torch(q, k, positions, rotary.cos, rotary.sin)
    assert torch.equal(rq, ref_q) and torch.equal(rk, ref_k)


# ---------------------------------------------------------------- 2. serving shapes on the GPU

HIDDEN, NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, INTERMEDIATE = 4096, 32, 8, 128, 14336


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("num_tokens", [1, 7, 256, 2048])
def test_gpu_add_rms_norm_bf16(num_tokens):
    torch.manual_seed(num_tokens)
    x = torch.randn(num_tokens, HIDDEN, dtype=torch.bfloat16, device="cuda")
    residual = 4 * torch.randn(num_tokens, HIDDEN, dtype=torch.bfloat16, device="cuda")
    weight = (1 + 0.1 * torch.randn(HIDDEN, device="cuda")).to(torch.bfloat16)
    out, new_residual = fused.fused_add_rms_norm(x, residual, weight, EPS)
    ref_out, ref_residual = fused._fused_add_rms_norm_torch(x, residual, weight, EPS)
    assert torch.equal(new_residual, ref_residual)
    # Same roundings as torch; only the sum of squares' order and rsqrt differ: <= 1 bf16 ulp.
    torch.testing.assert_close(out, ref_out, atol=1e-2, rtol=1.6e-2)
    assert (out != ref_out).float().mean() < 0.01
    torch.testing.assert_close(fused.rms_norm(x, weight, EPS), fused._rms_norm_torch(x, weight, EPS),
                               atol=1e-2, rtol=1.6e-2)


@pytest.mark.gpu
@gpu
def test_gpu_rms_norm_hidden_8192_and_qk_norm_views():
    torch.manual_seed(5)
    x = torch.randn(33, 8192, dtype=torch.bfloat16, device="cuda")
    weight = (1 + 0.1 * torch.randn(8192, device="cuda")).to(torch.bfloat16)
    torch.testing.assert_close(fused.rms_norm(x, weight, EPS), fused._rms_norm_torch(x, weight, EPS),
                               atol=1e-2, rtol=1.6e-2)
    _, q, _ = _qkv_views(33, NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, torch.bfloat16, "cuda")
    w = weight[:HEAD_DIM].contiguous()
    torch.testing.assert_close(fused.rms_norm(q, w, EPS), fused._rms_norm_torch(q, w, EPS), atol=1e-2, rtol=1.6e-2)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("num_tokens", [1, 7, 2048])
def test_gpu_rotary_bf16(num_tokens):
    torch.manual_seed(num_tokens + 1)
    rotary = RotaryEmbedding(HEAD_DIM, 8192, 500000.0, {
        "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}).to("cuda")
    _, q, k = _qkv_views(num_tokens, NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM, torch.bfloat16, "cuda")
    positions = torch.randint(0, 8192, (num_tokens,), device="cuda")
    ref_q, ref_k = fused._rotary_torch(q, k, positions, rotary.cos, rotary.sin)
    exact_q, exact_k = _rotary_fp32(q, positions, rotary), _rotary_fp32(k, positions, rotary)
    out_q, out_k = fused.rotary_(q, k, positions, rotary.cos, rotary.sin)
    assert out_q.data_ptr() == q.data_ptr() and out_k.data_ptr() == k.data_ptr(), "rotated in place"
    # fp32 math, one rounding: within 1 ulp of exact (FMA); the torch path rounds 3 times.
    torch.testing.assert_close(q, exact_q, atol=1e-2, rtol=8e-3)
    torch.testing.assert_close(k, exact_k, atol=1e-2, rtol=8e-3)
    torch.testing.assert_close(q, ref_q, atol=3e-2, rtol=2e-2)
    torch.testing.assert_close(k, ref_k, atol=3e-2, rtol=2e-2)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("num_tokens", [1, 7, 2048])
def test_gpu_silu_and_mul_bf16(num_tokens):
    torch.manual_seed(num_tokens + 2)
    gate_up = 3 * torch.randn(num_tokens, 2 * INTERMEDIATE, dtype=torch.bfloat16, device="cuda")
    out = fused.silu_and_mul(gate_up)
    ref = fused._silu_and_mul_torch(gate_up)
    torch.testing.assert_close(out, ref, atol=1e-2, rtol=1.6e-2)
    assert (out != ref).float().mean() < 0.01  # same roundings: only exp's last bits differ


@pytest.mark.gpu
@gpu
def test_gpu_kernels_replay_in_cuda_graph():
    """A decode step's worth of the three kernels, captured once and replayed on new inputs."""
    torch.manual_seed(6)
    bf16, num_tokens = torch.bfloat16, 4
    rotary = RotaryEmbedding(HEAD_DIM, 4096, 500000.0, None).to("cuda")
    weight = (1 + 0.1 * torch.randn(HIDDEN, device="cuda")).to(bf16)
    x = torch.randn(num_tokens, HIDDEN, dtype=bf16, device="cuda")
    residual = torch.randn_like(x)
    qkv = torch.randn(num_tokens, (NUM_Q_HEADS + 2 * NUM_KV_HEADS) * HEAD_DIM, dtype=bf16, device="cuda")
    positions = torch.zeros(num_tokens, dtype=torch.long, device="cuda")
    gate_up = torch.randn(num_tokens, 2 * INTERMEDIATE, dtype=bf16, device="cuda")

    def step():
        q, k, _ = qkv.split([HIDDEN, 1024, 1024], dim=-1)
        fused.rotary_(q.view(-1, NUM_Q_HEADS, HEAD_DIM), k.view(-1, NUM_KV_HEADS, HEAD_DIM), positions,
                      rotary.cos, rotary.sin)
        return fused.fused_add_rms_norm(x, residual, weight, EPS) + (fused.silu_and_mul(gate_up),)

    qkv_eager = qkv.clone()
    step()  # compile outside the capture
    qkv.copy_(qkv_eager)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for trial in range(2):
        for t in (x, residual, gate_up):
            t.copy_(torch.randn_like(t))
        positions.copy_(torch.randint(0, 4096, (num_tokens,), device="cuda"))
        qkv.copy_(torch.randn_like(qkv))
        qkv_before = qkv.clone()
        graph.replay()
        torch.cuda.synchronize()
        q, k, _ = qkv_before.split([HIDDEN, 1024, 1024], dim=-1)
        ref_q, ref_k = fused._rotary_torch(q.view(-1, NUM_Q_HEADS, HEAD_DIM), k.view(-1, NUM_KV_HEADS, HEAD_DIM),
                                           positions, rotary.cos, rotary.sin)
        torch.testing.assert_close(qkv[:, :HIDDEN], ref_q.reshape(num_tokens, -1), atol=3e-2, rtol=2e-2)
        torch.testing.assert_close(qkv[:, HIDDEN:HIDDEN + 1024], ref_k.reshape(num_tokens, -1), atol=3e-2, rtol=2e-2)
        ref_out, ref_residual = fused._fused_add_rms_norm_torch(x, residual, weight, EPS)
        assert torch.equal(outs[1], ref_residual)
        torch.testing.assert_close(outs[0], ref_out, atol=1e-2, rtol=1.6e-2)
        torch.testing.assert_close(outs[2], fused._silu_and_mul_torch(gate_up), atol=1e-2, rtol=1.6e-2)
