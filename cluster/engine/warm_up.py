"""Every kernel variant an instance can launch, run once before it serves.

Triton compiles a kernel the first time it meets a new variant (a constexpr, an int argument's
class, a pointer's alignment), for a second or more. On 2xH200 (2026-11-30, a fresh machine) the
first 1P1D requests waited 2.4-3.8 s for their first token, and under load a decode instance took a
1.8 s step. `ModelRunner` calls `warm_up` once, before it captures graphs:

  (1) a prefill of two prompts of unequal lengths: the prefill launch, norms with and without a
      residual, rotary, the KV store (every slot is -1: no KV is written);
  (2) the decode launch at each KV split count the backend may pick up to max_model_len.

All ranks of an instance run it at the same point (a TP forward all-reduces), and the experts'
load counters count none of its rows. What it cannot cover is kept from varying: the attention
kernel does not specialise on batch size or block-table width, and a step's upload starts every
field 16-byte aligned (runner.upload).
"""
from __future__ import annotations

import torch

from cluster.engine.attention.base import AttentionMetadata, AttnInputs
from cluster.models.moe import StackedExperts

PROMPT_LENGTHS = (40, 23)  # over the decode launch's query tile, unequal, one odd


@torch.inference_mode()
def warm_up(runner, max_model_len: int) -> None:
    device = runner.device
    lengths = [min(n, max_model_len) for n in PROMPT_LENGTHS]
    positions = torch.cat([torch.arange(n) for n in lengths]).to(device)
    num_tokens = positions.numel()
    starts = [0, lengths[0], num_tokens]
    width = -(-max(lengths) // runner.block_size)
    meta = AttentionMetadata(
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(lengths, dtype=torch.int32, device=device),
        block_tables=torch.zeros(len(lengths), width, dtype=torch.int32, device=device),
        slot_mapping=torch.full((num_tokens,), -1, dtype=torch.int64, device=device),
        max_query_len=max(lengths), max_seq_len=max(lengths), query_start_loc_cpu=starts, seq_lens_cpu=lengths)
    hidden = None
    if not getattr(runner.model, "is_first_stage", True):  # a later pipeline stage starts from activations
        hidden = torch.zeros(num_tokens, runner.model.cfg.hidden_size, dtype=runner.dtype, device=device)
    counters = {m: m.counts_load for m in runner.model.modules() if isinstance(m, StackedExperts)}
    for counter in counters:
        counter.counts_load = False  # whichever way the experts run (local, all-to-all)
    try:
        runner.model(torch.zeros(num_tokens, dtype=torch.int64, device=device), positions,
                     AttnInputs(runner.backend, meta, runner.kv_caches), hidden)
    finally:
        for counter, counts in counters.items():
            counter.counts_load = counts
    layer = next(iter(runner.model.model.layers.values())).self_attn
    k_cache, v_cache = runner.kv_caches[runner.first_kv_layer]
    runner.backend.warm_up(layer.num_heads, k_cache, v_cache, runner.max_blocks_per_seq * runner.block_size)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
