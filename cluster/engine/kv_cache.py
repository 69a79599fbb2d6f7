"""Where KV lives: a pool of fixed-size blocks, block tables, and a prefix cache.

No torch here; the tensors live in the model runner, this module only hands out
block ids. Invariants (checked by `check_invariants` in tests):

  - a block is either free (ref_count 0, in `free_queue`) or used (ref_count > 0);
  - a full block whose tokens are known carries a chain hash
        hash(block i) = H(hash(block i-1), tokens of block i)
    so equal prefixes map to equal hashes; `cached` maps hash -> block id;
  - freed blocks keep their hash and stay findable until they are reused:
    `free_queue` is LRU order, its head is evicted first (and loses its hash);
  - a sequence frees its blocks tail first, so the ends of prefixes go before
    their shared beginnings.

Slot arithmetic for a sequence (block_size 4):

    tokens:  t0 t1 t2 t3 | t4 t5 t6 t7 | t8 t9 .  .
    blocks:  block_ids[0]  block_ids[1]  block_ids[2]
    token p -> slot block_ids[p // 4] * 4 + p % 4
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from cluster.engine.sequence import Sequence


def chain_hash(parent: int | None, tokens: list[int]) -> int:
    """Stable across processes (the cluster's prefix index relies on it)."""
    h = hashlib.blake2b(digest_size=8)
    h.update((parent or 0).to_bytes(8, "little"))
    h.update(array("q", tokens).tobytes())
    return int.from_bytes(h.digest(), "little")


def prefix_hashes(token_ids: list[int], block_size: int) -> list[int]:
    hashes: list[int] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        hashes.append(chain_hash(hashes[-1] if hashes else None, token_ids[start : start + block_size]))
    return hashes


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True):
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}
        self.enable_caching = enable_caching
        self.num_hits = 0
        self.num_queries = 0

    @property
    def num_free(self) -> int:
        return len(self.free_queue)

    def lookup(self, hashes: list[int]) -> list[int]:
        """Longest cached prefix of `hashes` (block ids, not yet referenced)."""
        hits: list[int] = []
        if self.enable_caching:
            for h in hashes:
                block_id = self.cached.get(h)
                if block_id is None:
                    break
                hits.append(block_id)
        return hits

    def allocate(self, num: int) -> list[int]:
        if num > self.num_free:
            raise RuntimeError(f"KV block pool exhausted: asked for {num}, {self.num_free} free")
        out = []
        for _ in range(num):
            block_id, _ = self.free_queue.popitem(last=False)
            block = self.blocks[block_id]
            self._uncache(block)
            block.ref_count = 1
            out.append(block_id)
        return out

    def touch(self, block_ids: list[int]) -> None:
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free_queue[block_id]
            block.ref_count += 1

    def free(self, block_ids: list[int]) -> None:
        for block_id in reversed(block_ids):
            block = self.blocks[block_id]
            if block.ref_count <= 0:
                raise RuntimeError(f"double free of KV block {block_id}")
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[block_id] = None

    def set_hash(self, block_id: int, h: int) -> None:
        block = self.blocks[block_id]
        if not self.enable_caching or block.hash is not None:
            return
        block.hash = h
        self.cached.setdefault(h, block_id)

    def evict(self, num: int) -> int:
        """Drop the hashes of up to `num` least recently freed cached blocks."""
        dropped = 0
        for block_id in list(self.free_queue)[:num]:
            if self.blocks[block_id].hash is not None:
                self._uncache(self.blocks[block_id])
                dropped += 1
        return dropped

    def _uncache(self, block: Block) -> None:
        if block.hash is not None and self.cached.get(block.hash) == block.block_id:
            del self.cached[block.hash]
        block.hash = None

    def check_invariants(self) -> None:
        for block in self.blocks:
            assert block.ref_count >= 0, block
            assert (block.ref_count == 0) == (block.block_id in self.free_queue), block
        for h, block_id in self.cached.items():
            assert self.blocks[block_id].hash == h


class KVCacheManager:
    """Block tables of sequences on top of a BlockPool."""

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True):
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_caching)

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def num_blocks(self) -> int:
        return len(self.pool.blocks)

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def match_prefix(self, seq: Sequence) -> None:
        """On first admission: reuse cached blocks of the prompt's full blocks.

        At least one prompt token is always left to compute, since its logits
        pick the first output token; a prompt fully in cache recomputes its
        last block rather than writing into a shared one.
        """
        seq.block_hashes = prefix_hashes(seq.token_ids, self.block_size)
        hits = self.pool.lookup(seq.block_hashes)
        if len(hits) * self.block_size >= seq.num_tokens:
            hits = hits[:-1]
        self.pool.num_queries += seq.num_tokens
        self.pool.num_hits += len(hits) * self.block_size
        self.pool.touch(hits)
        seq.block_ids = list(hits)
        seq.num_registered_blocks = len(hits)
        seq.num_computed_tokens = len(hits) * self.block_size
        seq.num_cached_tokens = seq.num_computed_tokens

    def num_cached_prefix_tokens(self, seq: Sequence) -> int:
        """Tokens of a waiting `seq`'s prompt whose KV the cache holds now: what `match_prefix` would reuse
        if it were admitted at once. Reads only (nothing touched, no hit counted)."""
        if not self.pool.enable_caching or seq.num_tokens < self.block_size:
            return 0
        hits = len(self.pool.lookup(prefix_hashes(seq.token_ids, self.block_size)))
        return min(hits * self.block_size, (seq.num_tokens - 1) // self.block_size * self.block_size)

    def allocate_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Make room for `num_new_tokens` more KV entries; False (and no change) if the pool is short."""
        need = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_ids)
        if need <= 0:
            return True
        if need > self.pool.num_free:
            return False
        seq.block_ids.extend(self.pool.allocate(need))
        return True

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Child shares the parent's full prompt blocks (the partial tail it recomputes)."""
        num_full = min(parent.num_computed_tokens, child.num_tokens - 1) // self.block_size
        shared = parent.block_ids[:num_full]
        self.pool.touch(shared)
        child.block_ids = list(shared)
        child.block_hashes = parent.block_hashes[:num_full]
        child.num_registered_blocks = num_full
        child.num_computed_tokens = num_full * self.block_size
        child.num_cached_tokens = child.num_computed_tokens

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register hashes of blocks that became full of computed tokens (whose ids are known)."""
        num_full = min(seq.num_computed_tokens, seq.num_known_tokens) // self.block_size
        while len(seq.block_hashes) < num_full:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            seq.block_hashes.append(chain_hash(parent, seq.token_ids[i * self.block_size : (i + 1) * self.block_size]))
        for i in range(seq.num_registered_blocks, num_full):
            self.pool.set_hash(seq.block_ids[i], seq.block_hashes[i])
        seq.num_registered_blocks = max(seq.num_registered_blocks, num_full)

    def free(self, seq: Sequence) -> None:
        self.pool.free(seq.block_ids)
        seq.block_ids = []
        seq.num_registered_blocks = 0
        seq.block_hashes = seq.block_hashes[: seq.num_computed_tokens // self.block_size]

    def usage(self) -> float:
        return 1.0 - self.pool.num_free / max(1, self.num_blocks)

    def prefix_hit_rate(self) -> float:
        return self.pool.num_hits / max(1, self.pool.num_queries)
