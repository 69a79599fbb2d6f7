"""Reference attention: gather each sequence's paged KV and run SDPA on it.

Correct for any dtype and device and simple enough to trust; it is the oracle
the Triton kernels are tested against and the CPU backend of tests and the
embedded default.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from cluster.engine.attention.base import AttentionBackend, AttentionMetadata, write_kv


class TorchRefAttention(AttentionBackend):
    def forward(self, q, k, v, k_cache, v_cache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        block_size = k_cache.shape[1]
        group = q.shape[1] // k_cache.shape[2]
        for s in range(meta.num_seqs):
            q_lo, q_hi = meta.query_start_loc_cpu[s], meta.query_start_loc_cpu[s + 1]
            if q_hi == q_lo:
                continue
            seq_len = meta.seq_lens_cpu[s]
            num_blocks = (seq_len + block_size - 1) // block_size
            blocks = meta.block_tables[s, :num_blocks].long()
            keys = k_cache[blocks].flatten(0, 1)[:seq_len]  # [seq_len, kv_heads, d]
            values = v_cache[blocks].flatten(0, 1)[:seq_len]
            out[q_lo:q_hi] = _attend(q[q_lo:q_hi], keys, values, seq_len, group, scale)
        return out


def _attend(q, keys, values, seq_len: int, group: int, scale: float) -> torch.Tensor:
    query_len = q.shape[0]
    keys = keys.repeat_interleave(group, dim=1).transpose(0, 1)  # [heads, seq_len, d]
    values = values.repeat_interleave(group, dim=1).transpose(0, 1)
    q_pos = torch.arange(seq_len - query_len, seq_len, device=q.device)
    mask = torch.arange(seq_len, device=q.device)[None, :] <= q_pos[:, None]
    out = F.scaled_dot_product_attention(q.transpose(0, 1), keys, values, attn_mask=mask, scale=scale)
    return out.transpose(0, 1)
