"""TritonAttention against TorchRefAttention, run under the Triton interpreter on CPU.

Where the process already runs real (compiled) Triton with a GPU, the same
small cases run on CUDA instead. Triton is a hard requirement of this module:
it is skipped, loudly, only where triton is not installed.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported

try:
    import triton  # noqa: F401
except ImportError:
    pytest.skip("TRITON NOT INSTALLED: triton attention kernels are untested (pip install triton)",
                allow_module_level=True)

from benchmarks.attention import build_paged_batch  # noqa: E402
from cluster.engine.attention import triton as triton_attention  # noqa: E402
from cluster.engine.attention.base import AttentionMetadata  # noqa: E402
from cluster.engine.attention.torch_ref import TorchRefAttention  # noqa: E402
from cluster.engine.attention.triton import TritonAttention, choose_num_kv_splits, split_counts  # noqa: E402

pytestmark = pytest.mark.triton

_INTERPRETED = not isinstance(triton_attention._unified_attention_kernel, triton.runtime.jit.JITFunction)
DEVICE = "cpu" if _INTERPRETED else "cuda"
if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.fail("triton was imported before TRITON_INTERPRET=1 was set and there is no GPU",
                pytrace=False)

HEAD_DIM = 16
NUM_KV_HEADS = 2


def _run_both(seqs, group, *, block_size=16, num_pad_tokens=0, dtype=torch.float32, num_kv_splits=None,
              head_dim=HEAD_DIM, meta_override=None):
    torch.manual_seed(hash((tuple(seqs), group, block_size)) % 2**31)
    batch = build_paged_batch(
        seqs, num_heads=NUM_KV_HEADS * group, num_kv_heads=NUM_KV_HEADS, head_dim=head_dim,
        block_size=block_size, dtype=dtype, device=DEVICE, num_pad_tokens=num_pad_tokens)
    scale = head_dim ** -0.5
    ref_k_cache, ref_v_cache = batch.k_cache.clone(), batch.v_cache.clone()
    ref = TorchRefAttention().forward(batch.q, batch.k, batch.v, ref_k_cache, ref_v_cache, batch.meta, scale)
    meta = meta_override(batch.meta) if meta_override else batch.meta
    out = TritonAttention(num_kv_splits=num_kv_splits).forward(
        batch.q, batch.k, batch.v, batch.k_cache, batch.v_cache, meta, scale)
    # The caches must match bit for bit, NaN (never written) slots included: -1 slots were skipped.
    assert torch.equal(batch.k_cache.nan_to_num(7.0), ref_k_cache.nan_to_num(7.0))
    assert torch.equal(batch.v_cache.nan_to_num(7.0), ref_v_cache.nan_to_num(7.0))
    n = batch.num_real_tokens
    return out[:n].float(), ref[:n].float()


def _assert_close(out, ref, dtype=torch.float32):
    atol = 1e-4 if dtype == torch.float32 else 2e-2
    assert not out.isnan().any()
    torch.testing.assert_close(out, ref, atol=atol, rtol=atol)


# (cached tokens, query_len) per sequence: whole prompts, chunks over a prefix, decodes,
# short speculative chunks, page-boundary lengths and an empty (query_len 0) entry.
MIXED = [(0, 37), (45, 20), (70, 1), (0, 1), (130, 3), (16, 16), (5, 0), (200, 1), (31, 70)]


@pytest.mark.parametrize("group", [1, 2, 3, 4])
def test_mixed_batch_matches_reference(group):
    out, ref = _run_both(MIXED, group, num_pad_tokens=3)
    _assert_close(out, ref)


@pytest.mark.parametrize("block_size", [8, 32])
def test_other_block_sizes(block_size):
    out, ref = _run_both([(0, 40), (50, 1), (77, 9)], group=2, block_size=block_size)
    _assert_close(out, ref)


def test_decode_tile_boundary_query_lens():
    # group 4 -> decode tile holds 16 // 4 = 4 queries: 4 goes to the decode launch, 5 to prefill.
    out, ref = _run_both([(60, 4), (60, 5), (3, 4), (0, 5)], group=4)
    _assert_close(out, ref)


def test_long_prefill_crosses_many_tiles():
    out, ref = _run_both([(100, 150)], group=2)
    _assert_close(out, ref)


# The padding tokens' split partials are never written (torch.empty), so merging them
# may overflow in numpy; their outputs are garbage by contract and are not compared.
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("num_kv_splits", [2, 8])
@pytest.mark.parametrize("group", [1, 4])
def test_split_kv_decode(num_kv_splits, group):
    # 8 splits over <= 5 tiles of 64 leaves empty splits: their partials must weigh nothing.
    seqs = [(300, 1), (17, 1), (200, 1), (250, 4 if group == 4 else 1)]
    out, ref = _run_both(seqs, group, num_kv_splits=num_kv_splits, num_pad_tokens=2)
    _assert_close(out, ref)


def test_heuristic_split_path_batch1():
    assert choose_num_kv_splits(1, NUM_KV_HEADS, 300, 132) == 4
    out, ref = _run_both([(299, 1)], group=2)
    _assert_close(out, ref)


def test_choose_num_kv_splits():
    assert choose_num_kv_splits(1, 8, 32768, 132) == 32
    assert choose_num_kv_splits(1, 8, 1024, 132) == 16
    assert choose_num_kv_splits(32, 8, 1024, 132) == 2  # 256 programs: under two waves of 132 SMs
    assert choose_num_kv_splits(64, 4, 1024, 132) == 2  # TP=2 of Llama-3-8B at batch 64 (measured faster)
    assert choose_num_kv_splits(64, 8, 1024, 132) == 1
    assert choose_num_kv_splits(4, 8, 100, 132) == 1


@pytest.mark.parametrize("num_kv_heads,max_seq_len", [(8, 4096), (4, 4096), (8, 32768), (1, 256), (8, 100)])
def test_warm_up_covers_every_split_count_a_decode_may_pick(num_kv_heads, max_seq_len):
    """The runner's warm-up compiles the decode launch at `split_counts` before serving: every count
    the heuristic picks for any batch and context within max_seq_len must be among them (another
    would compile mid-serving, a second or more on a GPU)."""
    warmed = set(split_counts(None, num_kv_heads, max_seq_len, 132))
    picked = {choose_num_kv_splits(batch, num_kv_heads, seq_len, 132)
              for batch in range(1, 300) for seq_len in range(1, max_seq_len + 1, 7)}
    assert picked <= warmed, picked - warmed
    assert split_counts(8, num_kv_heads, max_seq_len, 132) == [8]  # a forced count is the only one


def test_warm_up_launches_each_split_count():
    """`TritonAttention.warm_up` runs the decode launch (and its merge) at each count without error."""
    k_cache = torch.zeros(4, 16, NUM_KV_HEADS, HEAD_DIM, device=DEVICE)
    backend = TritonAttention()
    backend.warm_up(NUM_KV_HEADS * 2, k_cache, k_cache.clone(), 512)
    assert len(split_counts(None, NUM_KV_HEADS, 512, 132)) > 1


def test_needs_no_host_lists_and_takes_upper_bounds():
    """CUDA-graph contract: no *_cpu lists read; max lens may be padded upper bounds."""

    def graph_meta(meta: AttentionMetadata) -> AttentionMetadata:
        return AttentionMetadata(
            query_start_loc=meta.query_start_loc, seq_lens=meta.seq_lens, block_tables=meta.block_tables,
            slot_mapping=meta.slot_mapping, max_query_len=1, max_seq_len=4096,
            query_start_loc_cpu=[], seq_lens_cpu=[])

    out, ref = _run_both([(90, 1), (10, 1), (150, 1)], group=2, num_pad_tokens=5, meta_override=graph_meta)
    _assert_close(out, ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes(dtype):
    if dtype == torch.bfloat16 and _INTERPRETED:
        pytest.skip("the Triton interpreter's tl.dot multiplies bf16 bit patterns as integers; "
                    "bf16 is covered by test_triton_attention_gpu.py")
    out, ref = _run_both([(20, 17), (40, 1)], group=2, dtype=dtype)
    _assert_close(out, ref, dtype)


def test_head_dim_must_be_power_of_two():
    with pytest.raises(ValueError, match="head_dim"):
        _run_both([(0, 3)], group=1, head_dim=24)
