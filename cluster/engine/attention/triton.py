"""Triton paged attention: one KV store kernel (triton_store.py) and one unified flash-attention kernel.

One `forward` call, for a flat batch that mixes prefill chunks and decodes:

1. `store_kv` scatters this step's K/V into the paged cache at `slot_mapping`
   (one program per token; slots < 0 return early, so padding costs no sync).
2. The *decode launch* takes every sequence whose queries fit in one small
   query tile (`query_len <= BLOCK_Q`: decodes, short speculative chunks).
   Grid `(num_seqs, num_kv_heads, num_kv_splits)`; the GQA query heads of one
   KV head are packed into the M dimension of the tile, so `tl.dot` runs on
   tensor cores even for a single query token:

       tile row m -> query  q_block * BLOCK_Q + m // GROUP
                     head   kv_head * GROUP   + m %  GROUP

3. The *prefill launch* (only when `max_query_len > BLOCK_Q`) takes the rest.
   Grid `(num_tokens // BLOCK_Q + num_seqs, num_kv_heads)`: sequence s owns
   q-tiles from `query_start_loc[s] // BLOCK_Q + s` on (an upper bound known
   from shapes alone), and a program finds its sequence by binary search.
4. Both launches walk the context page by page through `block_tables`, in
   KV tiles of TILE_N tokens, with an fp32 online softmax. Tiles entirely
   below the tile's first query need no causal mask; tiles past the last
   query are never visited.
5. With few sequences and long contexts (pure decode batches), the decode
   launch splits each context into `num_kv_splits` ranges ("flash decoding")
   that write fp32 partials; `_reduce_splits_kernel` merges them.

No step needs the `*_cpu` lists or a host sync: grids come from tensor shapes
and `meta.max_query_len` / `meta.max_seq_len`, which may be fixed upper bounds
(never below the truth: a sequence longer than `max_query_len` allows would be
left unattended), so a pure-decode step can be captured in a CUDA graph
(compile the kernels with one eager step before capturing).
"""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from cluster.engine.attention.base import AttentionBackend, AttentionMetadata
from cluster.engine.attention.triton_store import _check_attention_args, _last_dim_contiguous, store_kv

_LOG2_E = 1.4426950408889634
_MIN_TOKENS_PER_SPLIT = 64  # a split reads at least this much context
_MAX_KV_SPLITS = 64
_CPU_NUM_SMS = 132  # what the heuristic assumes off-GPU (an H100)


@triton.jit
def _find_seq(query_start_ptr, q_tile, num_seqs, BLOCK_Q: tl.constexpr):
    """Largest s with query_start_loc[s] // BLOCK_Q + s <= q_tile (binary search)."""
    lo = tl.program_id(0) * 0
    hi = lo + num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_tile = tl.load(query_start_ptr + mid) // BLOCK_Q + mid
        if first_tile <= q_tile:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _attend_tile(
    acc, l_i, m_i, q, k_cache_ptr, v_cache_ptr, bt_row_ptr, kv_head, tile_start, q_pos, seq_len,
    qk_scale, stride_kc_blk, stride_kc_tok, stride_kc_h, stride_vc_blk, stride_vc_tok, stride_vc_h,
    BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One online-softmax step over KV positions [tile_start, tile_start + TILE_N)."""
    offs_n = tl.arange(0, TILE_N)
    offs_d = tl.arange(0, HEAD_DIM)
    kv_pos = tile_start + offs_n
    kv_valid = kv_pos < seq_len
    if MASKED:
        page = tl.load(bt_row_ptr + kv_pos // BLOCK_SIZE, mask=kv_valid, other=0)
    else:
        page = tl.load(bt_row_ptr + kv_pos // BLOCK_SIZE)
    page = page.to(tl.int64)
    in_page = kv_pos % BLOCK_SIZE
    k_off = page * stride_kc_blk + in_page * stride_kc_tok + kv_head * stride_kc_h
    v_off = page * stride_vc_blk + in_page * stride_vc_tok + kv_head * stride_vc_h
    k_ptrs = k_cache_ptr + k_off[None, :] + offs_d[:, None]  # [HEAD_DIM, TILE_N]
    v_ptrs = v_cache_ptr + v_off[:, None] + offs_d[None, :]  # [TILE_N, HEAD_DIM]
    if MASKED:  # masked loads: cache slots past seq_len may hold NaN garbage
        k = tl.load(k_ptrs, mask=kv_valid[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=kv_valid[:, None], other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale  # log2 domain
    if MASKED:
        causal = (kv_pos[None, :] <= q_pos[:, None]) & kv_valid[None, :]
        s = tl.where(causal, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    if MASKED:  # a row may have seen no key yet: subtract 0 instead of -inf
        m_ref = tl.where(m_new > float("-inf"), m_new, 0.0)
    else:
        m_ref = m_new
    p = tl.exp2(s - m_ref[:, None])
    alpha = tl.exp2(m_i - m_ref)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


# Triton compiles a variant per value class of an int argument (1, a multiple of 16, other); these
# vary from step to step (batch, block-table width), so each would cost a compile of its own mid-serving
@triton.jit(do_not_specialize=["num_seqs", "min_query_len", "stride_bt_s"])
def _unified_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr,
    block_tables_ptr, seq_lens_ptr, query_start_ptr,
    num_seqs, num_heads, min_query_len, qk_scale,
    stride_q_t, stride_q_h, stride_o_t, stride_o_h,
    stride_kc_blk, stride_kc_tok, stride_kc_h, stride_vc_blk, stride_vc_tok, stride_vc_h,
    stride_bt_s,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    DECODE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    if DECODE:  # one program per sequence; only sequences that fit one q-tile
        seq = tl.program_id(0)
        q_tile = 0
    else:
        # Reversed, so the long causal rows (late q-tiles) start first and the tail is short.
        q_tile_id = tl.num_programs(0) - 1 - tl.program_id(0)
        seq = _find_seq(query_start_ptr, q_tile_id, num_seqs, BLOCK_Q)
        q_tile = q_tile_id - (tl.load(query_start_ptr + seq) // BLOCK_Q + seq)
    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    if (q_len < min_query_len) | (q_tile * BLOCK_Q >= q_len):
        return
    if DECODE:
        if q_len > BLOCK_Q:  # left to the prefill launch
            return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    query_idx = q_tile * BLOCK_Q + offs_m // GROUP
    row_valid = (offs_m < BLOCK_Q * GROUP) & (query_idx < q_len)
    head = kv_head * GROUP + offs_m % GROUP
    token = (q_start + query_idx).to(tl.int64)
    q_ptrs = q_ptr + token[:, None] * stride_q_t + head[:, None] * stride_q_h + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_valid[:, None], other=0.0)
    q_pos = context_len + query_idx

    # Keys the tile sees: [0, kv_end); tiles ending at or before first_q_pos are unmasked.
    first_q_pos = context_len + q_tile * BLOCK_Q
    kv_end = context_len + tl.minimum((q_tile + 1) * BLOCK_Q, q_len)
    num_tiles = tl.cdiv(kv_end, TILE_N)
    num_full_tiles = (first_q_pos + 1) // TILE_N
    tiles_per_split = tl.cdiv(num_tiles, NUM_SPLITS)
    tile_lo = split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)

    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    bt_row_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt_s
    for t in range(tile_lo, tl.minimum(tile_hi, num_full_tiles)):
        acc, l_i, m_i = _attend_tile(
            acc, l_i, m_i, q, k_cache_ptr, v_cache_ptr, bt_row_ptr, kv_head, t * TILE_N, q_pos, seq_len,
            qk_scale, stride_kc_blk, stride_kc_tok, stride_kc_h, stride_vc_blk, stride_vc_tok, stride_vc_h,
            BLOCK_SIZE, TILE_N, HEAD_DIM, False, DOT_PRECISION)
    for t in range(tl.maximum(tile_lo, num_full_tiles), tile_hi):
        acc, l_i, m_i = _attend_tile(
            acc, l_i, m_i, q, k_cache_ptr, v_cache_ptr, bt_row_ptr, kv_head, t * TILE_N, q_pos, seq_len,
            qk_scale, stride_kc_blk, stride_kc_tok, stride_kc_h, stride_vc_blk, stride_vc_tok, stride_vc_h,
            BLOCK_SIZE, TILE_N, HEAD_DIM, True, DOT_PRECISION)

    if NUM_SPLITS == 1:
        out = acc / l_i[:, None]
        o_ptrs = out_ptr + token[:, None] * stride_o_t + head[:, None] * stride_o_h + offs_d[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None])
    else:  # partials [num_tokens, num_heads, NUM_SPLITS(, HEAD_DIM)], unnormalised
        part = (token * num_heads + head) * NUM_SPLITS + split
        tl.store(part_m_ptr + part, m_i, mask=row_valid)
        tl.store(part_l_ptr + part, l_i, mask=row_valid)
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=row_valid[:, None])


@triton.jit
def _reduce_splits_kernel(
    out_ptr, part_acc_ptr, part_m_ptr, part_l_ptr, num_heads, stride_o_t, stride_o_h,
    NUM_SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    part = (token * num_heads + head) * NUM_SPLITS + tl.arange(0, NUM_SPLITS)
    m = tl.load(part_m_ptr + part)
    l = tl.load(part_l_ptr + part)
    m_max = tl.max(m, axis=0)
    m_max = tl.where(m_max > float("-inf"), m_max, 0.0)  # a padding row saw no key at all
    weight = tl.exp2(m - m_max)  # empty splits have m = -inf: weight 0
    denom = tl.sum(l * weight, axis=0)
    denom = tl.where(denom > 0.0, denom, 1.0)
    offs_d = tl.arange(0, HEAD_DIM)
    acc = tl.load(part_acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :])
    out = tl.sum(acc * weight[:, None], axis=0) / denom
    tl.store(out_ptr + token * stride_o_t + head * stride_o_h + offs_d, out.to(out_ptr.dtype.element_ty))


class TritonAttention(AttentionBackend):
    """The `triton` backend: `store_kv`, then `unified_attention` (see the module docstring)."""

    def __init__(self, num_kv_splits: int | None = None) -> None:
        # None: choose per step with `choose_num_kv_splits`; an int forces it (tests, benchmarks).
        self.num_kv_splits = num_kv_splits
        self._num_sms_by_device: dict[torch.device, int] = {}

    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        unified_attention(
            q, k_cache, v_cache, out, meta.query_start_loc, meta.seq_lens, meta.block_tables,
            max_query_len=meta.max_query_len, max_seq_len=meta.max_seq_len, scale=scale,
            num_kv_splits=self.num_kv_splits, num_sms=self._num_sms(q.device))
        return out

    def warm_up(self, num_heads: int, k_cache: torch.Tensor, v_cache: torch.Tensor, max_seq_len: int) -> None:
        warm_up(self, num_heads, k_cache, v_cache, max_seq_len)

    def _num_sms(self, device: torch.device) -> int:
        if device not in self._num_sms_by_device:
            count = _CPU_NUM_SMS
            if device.type == "cuda":
                count = torch.cuda.get_device_properties(device).multi_processor_count
            self._num_sms_by_device[device] = count
        return self._num_sms_by_device[device]


def unified_attention(
    q, k_cache, v_cache, out, query_start_loc, seq_lens, block_tables, *,
    max_query_len: int, max_seq_len: int, scale: float,
    num_kv_splits: int | None = None, num_sms: int = _CPU_NUM_SMS,
) -> None:
    """Causal paged attention of q [num_tokens, num_heads, head_dim] into `out` (same shape).

    `max_query_len` / `max_seq_len` may be upper bounds (CUDA graphs); they pick
    the launches and the split count, never a tensor index.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_seqs, num_kv_heads = seq_lens.shape[0], k_cache.shape[2]
    if num_tokens == 0 or num_seqs == 0:
        return
    _check_attention_args(q, k_cache, v_cache, out, num_kv_heads)
    q = _last_dim_contiguous(q)
    group = num_heads // num_kv_heads
    decode_cfg = _decode_config(group)
    decode_block_q = decode_cfg.block_m // group
    pure_decode = max_query_len <= decode_block_q
    if num_kv_splits is None:
        num_kv_splits = choose_num_kv_splits(num_seqs, num_kv_heads, max_seq_len, num_sms) if pure_decode else 1
    if num_kv_splits > 1 and not pure_decode:
        raise ValueError(f"num_kv_splits={num_kv_splits} needs max_query_len <= {decode_block_q}")
    if num_kv_splits & (num_kv_splits - 1):
        raise ValueError(f"num_kv_splits={num_kv_splits} must be a power of two")

    common = dict(
        q=q, k_cache=k_cache, v_cache=v_cache, out=out, block_tables=block_tables,
        seq_lens=seq_lens, query_start_loc=query_start_loc, scale=scale, group=group,
    )
    if num_kv_splits == 1:
        _launch(**common, grid=(num_seqs, num_kv_heads, 1), cfg=decode_cfg, min_query_len=1,
                decode=True, partials=None)
    else:
        partials = _alloc_partials(num_tokens, num_heads, num_kv_splits, head_dim, q.device)
        _launch(**common, grid=(num_seqs, num_kv_heads, num_kv_splits), cfg=decode_cfg, min_query_len=1,
                decode=True, partials=partials)
        _reduce_splits_kernel[(num_tokens, num_heads)](
            out, *partials, num_heads, out.stride(0), out.stride(1),
            NUM_SPLITS=num_kv_splits, HEAD_DIM=head_dim)
    if not pure_decode:
        prefill_cfg = _prefill_config(group, head_dim)
        num_q_tiles = num_tokens // (prefill_cfg.block_m // group) + num_seqs
        _launch(**common, grid=(num_q_tiles, num_kv_heads, 1), cfg=prefill_cfg,
                min_query_len=decode_block_q + 1, decode=False, partials=None)


def warm_up(backend: "TritonAttention", num_heads: int, k_cache: torch.Tensor, v_cache: torch.Tensor,
            max_seq_len: int) -> None:
    """Compile the decode launch at every KV split count `choose_num_kv_splits` can pick for contexts up
    to `max_seq_len` (a variant each, with its merge kernel): one query over one block."""
    device, dtype = k_cache.device, k_cache.dtype
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    q = torch.zeros(1, num_heads, head_dim, dtype=dtype, device=device)
    query_start = torch.tensor([0, 1], dtype=torch.int32, device=device)
    seq_lens = torch.ones(1, dtype=torch.int32, device=device)
    tables = torch.zeros(1, 1, dtype=torch.int32, device=device)
    for splits in split_counts(backend.num_kv_splits, num_kv_heads, max_seq_len, backend._num_sms(device)):
        unified_attention(q, k_cache, v_cache, torch.empty_like(q), query_start, seq_lens, tables, max_query_len=1,
                          max_seq_len=max_seq_len, scale=1.0, num_kv_splits=splits)


def split_counts(forced: int | None, num_kv_heads: int, max_seq_len: int, num_sms: int) -> list[int]:
    """Every KV split count a decode launch may use for contexts up to `max_seq_len`: `forced`, or
    the powers of two up to what `choose_num_kv_splits` picks for a single sequence (its most)."""
    if forced:
        return [forced]
    widest = choose_num_kv_splits(1, num_kv_heads, max_seq_len, num_sms)
    return [1 << i for i in range(widest.bit_length())]


def choose_num_kv_splits(num_seqs: int, num_kv_heads: int, max_seq_len: int, num_sms: int) -> int:
    """Split KV only while (sequence, kv head) programs fill under ~2 waves of SMs.

    Each split keeps >= _MIN_TOKENS_PER_SPLIT tokens so the partials stay cheap;
    e.g. H100, 8 kv heads: batch 1 @ 32k -> 32 splits, batch 1 @ 1k -> 16, batch 32 -> 1.
    Measured on H200 (132 SMs) at 1k context (`benchmarks.attention --split-sweep`): 4 kv heads (TP=2
    of Llama-3-8B) at batch 64, 256 programs: 2 splits 44.8 us, 1 split 50.5 us; 8 kv heads at
    batch 64 (512 programs) and either at batch 256: 1 split is fastest by 8-15%.
    """
    num_programs = num_seqs * num_kv_heads
    if num_programs >= 2 * num_sms:
        return 1
    wanted = min(triton.cdiv(2 * num_sms, num_programs), max_seq_len // _MIN_TOKENS_PER_SPLIT, _MAX_KV_SPLITS)
    return 1 if wanted <= 1 else 1 << (wanted.bit_length() - 1)  # round down to a power of two


@dataclass(frozen=True)
class _LaunchConfig:
    block_m: int  # query-tile rows: BLOCK_Q tokens x GROUP heads
    tile_n: int  # KV tokens per inner step
    num_warps: int
    num_stages: int


# Tuned on an H100 with triton 3.6 (bf16, 32/8 heads, dim 128): decode configs
# were within ~3% of each other; for prefill (64, 64, 4 warps) and
# (128, 128, 8 warps, 3 stages) were up to ~5% faster on some shapes, not all.
def _decode_config(group: int) -> _LaunchConfig:
    # 16 rows is the smallest tl.dot M; one decode token fills `group` of them.
    return _LaunchConfig(max(16, triton.next_power_of_2(group)), tile_n=64, num_warps=4, num_stages=2)


def _prefill_config(group: int, head_dim: int) -> _LaunchConfig:
    block_m = max(128 if head_dim <= 128 else 64, triton.next_power_of_2(group))
    return _LaunchConfig(block_m, tile_n=64, num_warps=8 if block_m >= 128 else 4, num_stages=2)


def _launch(*, q, k_cache, v_cache, out, block_tables, seq_lens, query_start_loc, scale, group,
            grid, cfg: _LaunchConfig, min_query_len: int, decode: bool, partials) -> None:
    num_seqs, num_heads, head_dim = seq_lens.shape[0], q.shape[1], q.shape[2]
    part_acc, part_m, part_l = partials if partials is not None else (out, out, out)
    _unified_attention_kernel[grid](
        q, k_cache, v_cache, out, part_acc, part_m, part_l,
        block_tables, seq_lens, query_start_loc,
        num_seqs, num_heads, min_query_len, scale * _LOG2_E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        GROUP=group, BLOCK_M=cfg.block_m, BLOCK_Q=cfg.block_m // group, HEAD_DIM=head_dim,
        BLOCK_SIZE=k_cache.shape[1], TILE_N=cfg.tile_n, NUM_SPLITS=grid[2], DECODE=decode,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def _alloc_partials(num_tokens: int, num_heads: int, num_splits: int, head_dim: int, device):
    acc = torch.empty((num_tokens, num_heads, num_splits, head_dim), dtype=torch.float32, device=device)
    m = torch.empty((num_tokens, num_heads, num_splits), dtype=torch.float32, device=device)
    l = torch.empty((num_tokens, num_heads, num_splits), dtype=torch.float32, device=device)
    return acc, m, l
