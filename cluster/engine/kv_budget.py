"""How many KV blocks an instance gets: every rank sizes its own share, the instance takes the minimum.

  (1) a fixed CacheConfig.num_blocks wins;
  (2) else the byte budget (CacheConfig.memory_budget_bytes; on a GPU, a fraction of the
      free memory left after weights, less room for the largest step's activations;
      on CPU a fixed 256 MiB) divided by this rank's bytes per block (its layers, its
      KV heads);
  (3) capped at twice what every running sequence at full length needs (more is only
      prefix cache), and refused if one max-length sequence would not fit.
"""
from __future__ import annotations

import torch

from cluster.config import EngineConfig

CPU_KV_BUDGET_BYTES = 256 << 20


def num_kv_blocks(config: EngineConfig, arch, model, device: torch.device, dtype: torch.dtype, max_model_len: int) -> int:
    from cluster.engine.runner import kv_bytes_per_block

    cache = config.cache
    if cache.num_blocks is not None:
        return cache.num_blocks
    per_block = kv_bytes_per_block(model, cache.block_size, dtype)
    if cache.memory_budget_bytes is not None:
        budget = cache.memory_budget_bytes
    elif device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * cache.gpu_memory_fraction) - activation_reserve_bytes(config, arch, dtype)
    else:
        budget = CPU_KV_BUDGET_BYTES
    min_blocks = -(-max_model_len // cache.block_size)
    num_blocks = min(budget // per_block, 2 * config.scheduler.max_num_seqs * min_blocks)
    if num_blocks < min_blocks:
        raise ValueError(f"KV budget of {budget} bytes holds {num_blocks} blocks, fewer than one max-length "
                         f"sequence needs ({min_blocks}); raise CacheConfig.memory_budget_bytes or lower max_model_len")
    return int(num_blocks)


def activation_reserve_bytes(config: EngineConfig, arch, dtype: torch.dtype) -> int:
    """Room left for activations of the largest step (a generous estimate, plus 1 GiB slack)."""
    tokens = config.scheduler.max_num_batched_tokens
    width = max(arch.intermediate_size, arch.moe_intermediate_size * arch.num_experts_per_tok) * 2 + arch.hidden_size * 4
    logits = config.scheduler.max_num_seqs * arch.vocab_size * 4 * 2
    return tokens * width * torch.tensor([], dtype=dtype).element_size() * 2 + logits + (1 << 30)
