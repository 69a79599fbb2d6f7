"""KV block pool and block tables: random operation sequences never leak or double-free."""
from hypothesis import given, settings, strategies as st

from cluster.engine.kv_cache import BlockPool, KVCacheManager, prefix_hashes
from cluster.engine.sequence import Sequence
from cluster.types import SamplingParams

BLOCK = 4


def _seq(tokens, request_id="r"):
    return Sequence(request_id, 0, list(tokens), SamplingParams(), 0.0, 10_000)


def _check(kv: KVCacheManager, live: list[Sequence]) -> None:
    kv.pool.check_invariants()
    refs = [0] * kv.num_blocks
    for seq in live:
        for block_id in seq.block_ids:
            refs[block_id] += 1
    assert [b.ref_count for b in kv.pool.blocks] == refs, "a block's ref count differs from the tables that hold it"


ops = st.lists(
    st.tuples(st.sampled_from(["add", "append", "fork", "free", "evict"]), st.integers(0, 7), st.integers(1, 9)),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(ops=ops, prefix_vocab=st.integers(1, 3))
def test_random_operations_never_leak_or_double_free(ops, prefix_vocab):
    kv = KVCacheManager(num_blocks=24, block_size=BLOCK)
    live: list[Sequence] = []
    for op, pick, n in ops:
        if op == "add":
            seq = _seq([(pick + i) % prefix_vocab for i in range(n * 3)])
            kv.match_prefix(seq)
            if kv.allocate_slots(seq, seq.num_uncomputed):
                seq.num_computed_tokens = seq.num_tokens
                kv.cache_full_blocks(seq)
                live.append(seq)
            else:
                kv.free(seq)
        elif op == "append" and live:
            seq = live[pick % len(live)]
            seq.token_ids.extend([pick] * n)
            if kv.allocate_slots(seq, seq.num_uncomputed):
                seq.num_computed_tokens = seq.num_tokens
                kv.cache_full_blocks(seq)
            else:
                del seq.token_ids[seq.num_computed_tokens :]
        elif op == "fork" and live:
            parent = live[pick % len(live)]
            child = _seq(parent.prompt_token_ids, "child")
            kv.fork(parent, child)
            live.append(child)
        elif op == "free" and live:
            kv.free(live.pop(pick % len(live)))
        elif op == "evict":
            kv.pool.evict(n)
        _check(kv, live)
    for seq in live:
        kv.free(seq)
    _check(kv, [])
    assert kv.num_free_blocks == kv.num_blocks


def test_prefix_hit_reuses_blocks_and_leaves_one_token_to_compute():
    kv = KVCacheManager(num_blocks=16, block_size=BLOCK)
    first = _seq(range(10))
    kv.match_prefix(first)
    assert kv.allocate_slots(first, 10)
    first.num_computed_tokens = 10
    kv.cache_full_blocks(first)
    second = _seq(list(range(8)) + [99, 98])
    kv.match_prefix(second)
    assert second.num_computed_tokens == 8 and second.block_ids == first.block_ids[:2]
    exact = _seq(range(8))  # fully cached prompt: its last block is recomputed, not shared
    kv.match_prefix(exact)
    assert exact.num_computed_tokens == 4
    for seq in (first, second, exact):
        kv.free(seq)
    assert kv.num_free_blocks == 16


def test_freed_blocks_stay_cached_until_reused_lru():
    pool = BlockPool(4)
    ids = pool.allocate(2)
    hashes = prefix_hashes(list(range(8)), BLOCK)
    for block_id, h in zip(ids, hashes):
        pool.set_hash(block_id, h)
    pool.free(ids)
    assert pool.lookup(hashes) == ids
    pool.allocate(3)  # two never-used blocks first, then the least recently freed: the tail block (freed first)
    assert pool.lookup(hashes) == [ids[0]]
    pool.check_invariants()


def test_double_free_is_caught():
    pool = BlockPool(2)
    ids = pool.allocate(1)
    pool.free(ids)
    try:
        pool.free(ids)
    except RuntimeError as exc:
        assert "double free" in str(exc)
    else:
        raise AssertionError("double free went unnoticed")


def test_chain_hash_depends_on_whole_prefix():
    a = prefix_hashes([1, 2, 3, 4, 5, 6, 7, 8], BLOCK)
    b = prefix_hashes([0, 2, 3, 4, 5, 6, 7, 8], BLOCK)
    assert a[0] != b[0] and a[1] != b[1]
    assert prefix_hashes([1, 2, 3, 4, 5, 6, 7, 8], BLOCK) == a


def test_a_waiting_prompts_cached_prefix_is_counted_without_touching_the_cache():
    """What admission subtracts from a queued prompt: the prefix whose KV is cached now, in whole blocks,
    never the last token (its logits pick the first output token), and nothing referenced or counted."""
    kv = KVCacheManager(num_blocks=16, block_size=BLOCK)
    first = _seq(range(10))  # 2 full blocks + 2 tokens
    kv.match_prefix(first)
    assert kv.allocate_slots(first, first.num_uncomputed)
    first.num_computed_tokens = first.num_tokens
    kv.cache_full_blocks(first)
    refs, queries = [b.ref_count for b in kv.pool.blocks], kv.pool.num_queries
    assert kv.num_cached_prefix_tokens(_seq([*range(10), 99, 98])) == 8
    assert kv.num_cached_prefix_tokens(_seq(range(8))) == 4  # fully cached: the last block recomputes
    assert kv.num_cached_prefix_tokens(_seq([5, *range(9)])) == 0
    assert [b.ref_count for b in kv.pool.blocks] == refs and kv.pool.num_queries == queries
    assert KVCacheManager(16, BLOCK, enable_caching=False).num_cached_prefix_tokens(_seq(range(10))) == 0
