"""Attention micro-benchmark: `python -m benchmarks.attention` (needs a CUDA GPU and triton).

1. `build_paged_batch` lays out a synthetic step: each sequence's cached prefix
   scattered over randomly permuted cache blocks, plus this step's new tokens
   (the tests reuse it).
2. Each case runs the chosen backend (default `triton`) eagerly (`eager_us`:
   median single call from an idle GPU, host launch cost included), then
   captured in a CUDA graph and replayed back to back (`gpu_us`: GPU time).
3. One JSON line per case: both times, KV bytes read / gpu time as HBM GB/s,
   and attention TFLOP/s (causal: only the visible query-key pairs count).
   Small cases (batch 1 at 1k: 4 MB of KV) sit in the 50 MB L2 across replays.
"""
import argparse
import json
from dataclasses import dataclass

import torch

from benchmarks.harness import graph_time_ms
from cluster.engine.attention.base import AttentionMetadata


@dataclass
class PagedBatch:
    """One step's inputs; tokens past `num_real_tokens` are padding with slot -1."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    meta: AttentionMetadata
    num_real_tokens: int


def build_paged_batch(
    seqs: list[tuple[int, int]], *, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
    dtype: torch.dtype, device: str | torch.device, num_pad_tokens: int = 0, num_spare_blocks: int = 3,
    fill_unused=float("nan"),
) -> PagedBatch:
    """`seqs` = [(num_cached_tokens, query_len)]; unused cache slots hold `fill_unused`."""
    seq_lens = [cached + query_len for cached, query_len in seqs]
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(blocks_per_seq) + num_spare_blocks
    perm = torch.randperm(num_blocks).tolist()
    width = max(blocks_per_seq) + 1
    # Columns past a sequence's last block hold valid but unrelated block ids.
    block_tables = torch.randint(0, num_blocks, (len(seqs), width), dtype=torch.int32)
    for s, n in enumerate(blocks_per_seq):
        block_tables[s, :n] = torch.tensor(perm[:n], dtype=torch.int32)
        perm = perm[n:]

    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(cache_shape, fill_unused, dtype=dtype, device=device)
    v_cache = torch.full(cache_shape, fill_unused, dtype=dtype, device=device)
    new_slots = []
    for s, (cached, query_len) in enumerate(seqs):
        positions = torch.arange(cached + query_len)
        slots = block_tables[s, positions // block_size].long() * block_size + positions % block_size
        prefix = slots[:cached].to(device)
        k_cache.view(-1, num_kv_heads, head_dim)[prefix] = _randn((cached, num_kv_heads, head_dim), dtype, device)
        v_cache.view(-1, num_kv_heads, head_dim)[prefix] = _randn((cached, num_kv_heads, head_dim), dtype, device)
        new_slots.append(slots[cached:])
    new_slots.append(torch.full((num_pad_tokens,), -1, dtype=torch.long))

    num_real_tokens = sum(query_len for _, query_len in seqs)
    num_tokens = num_real_tokens + num_pad_tokens
    query_start = [0]
    for _, query_len in seqs:
        query_start.append(query_start[-1] + query_len)
    meta = AttentionMetadata(
        query_start_loc=torch.tensor(query_start, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=block_tables.to(device),
        slot_mapping=torch.cat(new_slots).to(device),
        max_query_len=max(query_len for _, query_len in seqs),
        max_seq_len=max(seq_lens),
        query_start_loc_cpu=query_start,
        seq_lens_cpu=seq_lens,
    )
    return PagedBatch(
        q=_randn((num_tokens, num_heads, head_dim), dtype, device),
        k=_randn((num_tokens, num_kv_heads, head_dim), dtype, device),
        v=_randn((num_tokens, num_kv_heads, head_dim), dtype, device),
        k_cache=k_cache, v_cache=v_cache, meta=meta, num_real_tokens=num_real_tokens,
    )


def _randn(shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    return torch.randn(shape, device=device).to(dtype)


def _cases() -> list[tuple[str, list[tuple[int, int]]]]:
    ctx = 1024
    cases = [(f"decode_b{b}_ctx{ctx}", [(ctx - 1, 1)] * b) for b in (1, 32, 128)]
    cases += [("decode_b1_ctx32768", [(32767, 1)]), ("prefill_2k", [(0, 2048)])]
    cases += [("mixed_prefill512_decode64_ctx1k", [(0, 512)] + [(ctx - 1, 1)] * 64)]
    return cases


def _time_ms(fn, warmup: int, repeats: int) -> float:
    """Median of single calls, each timed from an idle GPU: host launch cost included."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _work(seqs, num_heads: int, num_kv_heads: int, head_dim: int, elem_bytes: int) -> tuple[int, int]:
    """(KV bytes read once per kv head, causal attention FLOPs)."""
    kv_bytes = sum(c + n for c, n in seqs) * num_kv_heads * head_dim * 2 * elem_bytes
    pairs = sum(n * c + n * (n + 1) // 2 for c, n in seqs)  # visible (query, key) pairs
    return kv_bytes, 4 * pairs * num_heads * head_dim


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="triton", choices=["triton", "torch_ref"])
    parser.add_argument("--num-heads", type=int, default=32)
    parser.add_argument("--num-kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--split-sweep", action="store_true",
                        help="decode at 1k context, batch 64/256, 8 and 4 KV heads (TP=1 and TP=2 of Llama-3-8B): "
                             "GPU time per forced KV split count beside the automatic choice")
    args = parser.parse_args()
    if args.split_sweep:
        return _split_sweep(args)
    from cluster.engine.attention.backends import make_backend

    backend = make_backend(args.backend, torch.device("cuda"))
    torch.manual_seed(0)
    for name, seqs in _cases():
        batch = build_paged_batch(
            seqs, num_heads=args.num_heads, num_kv_heads=args.num_kv_heads, head_dim=args.head_dim,
            block_size=args.block_size, dtype=torch.bfloat16, device="cuda", fill_unused=0.0)
        fn = lambda: backend.forward(  # noqa: E731
            batch.q, batch.k, batch.v, batch.k_cache, batch.v_cache, batch.meta, args.head_dim ** -0.5)
        eager_ms = _time_ms(fn, warmup=5, repeats=args.repeats)
        # torch_ref syncs on the host (slot checks), so it cannot be captured.
        ms = graph_time_ms(fn, repeats=args.repeats) if args.backend == "triton" else eager_ms
        kv_bytes, flops = _work(seqs, args.num_heads, args.num_kv_heads, args.head_dim, 2)
        print(json.dumps({
            "case": name, "backend": args.backend, "gpu_us": round(ms * 1e3, 2),
            "eager_us": round(eager_ms * 1e3, 2), "hbm_gb_per_s": round(kv_bytes / ms / 1e6, 1),
            "tflop_per_s": round(flops / ms / 1e9, 2), "kv_bytes": kv_bytes, "gpu": torch.cuda.get_device_name(),
        }), flush=True)


def _split_sweep(args) -> None:
    from cluster.engine.attention.triton import TritonAttention, choose_num_kv_splits

    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for num_kv_heads in (8, 4):
        num_heads = num_kv_heads * 4
        for b in (1, 64, 256):
            seqs = [(1023, 1)] * b
            batch = build_paged_batch(seqs, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=args.head_dim,
                                      block_size=args.block_size, dtype=torch.bfloat16, device="cuda", fill_unused=0.0)
            kv_bytes, _ = _work(seqs, num_heads, num_kv_heads, args.head_dim, 2)
            row = {"case": f"decode_b{b}_ctx1k_kvh{num_kv_heads}", "auto_splits": choose_num_kv_splits(b, num_kv_heads, 4608, sms)}
            for splits in (None, 1, 2, 4, 8):
                backend = TritonAttention(num_kv_splits=splits)
                meta = batch.meta
                meta = type(meta)(meta.query_start_loc, meta.seq_lens, meta.block_tables, meta.slot_mapping, 1, 4608, [], [])
                fn = lambda: backend.forward(  # noqa: E731
                    batch.q, batch.k, batch.v, batch.k_cache, batch.v_cache, meta, args.head_dim ** -0.5)
                ms = graph_time_ms(fn, repeats=args.repeats)
                row[f"us_splits_{splits or 'auto'}"] = round(ms * 1e3, 2)
                row[f"gb_s_splits_{splits or 'auto'}"] = round(kv_bytes / ms / 1e6, 1)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
