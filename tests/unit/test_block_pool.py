"""BlockPool and KVCacheManager driven with plain ints (no torch)."""

from __future__ import annotations

import pytest

from app.engine.core.block_pool import BlockPool, NoFreeBlocksError
from app.engine.core.kv_cache_manager import KVCacheManager, hash_block


def test_allocate_free_roundtrip_is_lru() -> None:
    pool = BlockPool(4)
    a, b = pool.allocate(), pool.allocate()
    assert pool.num_free_blocks == 2
    pool.free([b])
    pool.free([a])
    # least recently freed first: the two never-used blocks, then b, then a
    order = [pool.allocate().block_id for _ in range(4)]
    assert order == [2, 3, b.block_id, a.block_id]
    with pytest.raises(NoFreeBlocksError):
        pool.allocate()


def test_double_free_is_detected() -> None:
    pool = BlockPool(2)
    block = pool.allocate()
    pool.free([block])
    with pytest.raises(RuntimeError, match="double free"):
        pool.free([block])


def test_cached_block_is_revived_and_evicted_on_reuse() -> None:
    pool = BlockPool(2)
    block = pool.allocate()
    h = hash_block(None, [1, 2, 3, 4])
    pool.cache_block(block, h)
    pool.free([block])
    assert pool.get_cached(h) is block
    pool.touch(block)  # prefix hit on a free block takes it off the free list
    assert block.ref_cnt == 1 and pool.num_free_blocks == 1
    pool.free([block])
    pool.allocate()
    pool.allocate()  # the cached block is the oldest free one now: evicted
    assert pool.get_cached(h) is None


def test_hash_chain_depends_on_parent() -> None:
    a = hash_block(None, [1, 2])
    assert hash_block(a, [3, 4]) != hash_block(None, [3, 4])
    assert hash_block(None, [1, 2]) == a


def test_prefix_cache_shares_full_blocks_and_keeps_last_token() -> None:
    kv = KVCacheManager(num_blocks=10, block_size=4)
    prompt = list(range(10))  # 2 full blocks + 2 tokens
    assert kv.find_cached_prefix(prompt) == []
    assert kv.allocate_slots(1, 0, len(prompt)) == []
    kv.cache_full_blocks(1, prompt, len(prompt))
    hits = kv.find_cached_prefix(prompt)
    assert [b.block_id for b in hits] == kv.block_table(1)[:2]
    # a prompt of exactly 8 tokens may reuse only 1 block: its last token must be computed
    assert len(kv.find_cached_prefix(prompt[:8])) == 1
    assert kv.allocate_slots(2, 8, 3, hits) == []
    assert kv.block_table(2)[:2] == kv.block_table(1)[:2]
    kv.check_integrity()
    kv.free(1)
    kv.free(2)
    kv.check_integrity()
    assert kv.num_free_blocks == 10


def test_allocation_failure_changes_nothing() -> None:
    kv = KVCacheManager(num_blocks=3, block_size=4)
    assert kv.allocate_slots(1, 0, 8) == []
    assert kv.allocate_slots(2, 0, 8) is None
    assert not kv.has_seq(2)
    assert kv.num_free_blocks == 1
    kv.check_integrity()


def test_fork_copy_on_write() -> None:
    kv = KVCacheManager(num_blocks=6, block_size=4)
    tokens = [1, 2, 3, 4, 5, 6]
    kv.allocate_slots(1, 0, 6)
    kv.cache_full_blocks(1, tokens, 6)
    kv.fork(1, 2)
    assert kv.block_table(2) == kv.block_table(1)
    kv.check_integrity()
    # the child writes position 6, inside the shared partial block: it gets its own copy
    copies = kv.allocate_slots(2, 6, 1)
    assert copies == [(kv.block_table(1)[1], kv.block_table(2)[1])]
    assert kv.block_table(2)[0] == kv.block_table(1)[0]  # the full block stays shared
    # the parent is now the only owner of its partial block: no copy for it
    assert kv.allocate_slots(1, 6, 1) == []
    kv.check_integrity()
    for seq in (1, 2):
        kv.free(seq)
    kv.check_integrity()
    assert kv.num_free_blocks == 6


def test_fork_at_block_boundary_needs_no_copy() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=4)
    kv.allocate_slots(1, 0, 4)
    kv.fork(1, 2)
    assert kv.allocate_slots(2, 4, 1) == []
    assert kv.block_table(2)[0] == kv.block_table(1)[0]
    assert len(kv.block_table(2)) == 2


def test_prefix_counters() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=2)
    prompt = [5, 6, 7, 8, 9]
    kv.find_cached_prefix(prompt)
    kv.allocate_slots(1, 0, 5)
    kv.cache_full_blocks(1, prompt, 5)
    kv.find_cached_prefix(prompt)
    assert (kv.prefix_queries, kv.prefix_hits) == (4, 2)
