"""Block manager: ref counts, free list, prefix-cache hits with token verification, LRU eviction."""

from __future__ import annotations

from engine_helpers import make_seq

from tokenmill.engine.block_manager import BlockManager


def _prefill(bm: BlockManager, seq) -> None:
    bm.match_prefix(seq)
    bm.allocate(seq, seq.num_tokens - seq.num_computed_tokens)
    seq.num_computed_tokens = seq.num_tokens
    bm.cache_full_blocks(seq)


def test_allocate_and_free_returns_every_block():
    bm = BlockManager(num_blocks=10, block_size=4, enable_prefix_caching=False)
    a, b = make_seq("a", list(range(9))), make_seq("b", list(range(100, 105)))
    bm.allocate(a, 9)
    bm.allocate(b, 5)
    assert len(a.block_table) == 3 and len(b.block_table) == 2
    assert bm.num_free_blocks == 5
    assert not set(a.block_table) & set(b.block_table)
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 10
    assert all(block.ref_count == 0 for block in bm.blocks)


def test_can_allocate_counts_blocks_already_held():
    bm = BlockManager(num_blocks=3, block_size=4, enable_prefix_caching=False)
    seq = make_seq("s", list(range(4)))
    bm.allocate(seq, 4)
    seq.num_computed_tokens = 4
    assert bm.can_allocate(seq, 8)  # needs 2 more blocks, 2 free
    assert not bm.can_allocate(seq, 9)


def test_second_identical_prompt_hits_the_prefix_cache():
    bm = BlockManager(num_blocks=16, block_size=4)
    prompt = list(range(1, 11))  # 10 tokens: 2 full blocks + 2
    first = make_seq("first", prompt)
    _prefill(bm, first)
    assert bm.prefix_cache_hits == 0
    second = make_seq("second", prompt)
    bm.match_prefix(second)
    assert second.num_computed_tokens == 8
    assert second.block_table == first.block_table[:2]
    assert bm.blocks[first.block_table[0]].ref_count == 2
    assert bm.prefix_cache_hits == 8


def test_full_prompt_hit_leaves_one_token_to_compute():
    bm = BlockManager(num_blocks=16, block_size=4)
    prompt = list(range(8))  # exactly two blocks
    _prefill(bm, make_seq("a", prompt))
    again = make_seq("b", prompt)
    bm.match_prefix(again)
    assert again.num_computed_tokens == 4  # the last block is recomputed to produce logits


def test_different_prefix_misses_and_chained_hash_stops_at_divergence():
    bm = BlockManager(num_blocks=16, block_size=4)
    _prefill(bm, make_seq("a", [1, 2, 3, 4, 5, 6, 7, 8, 9]))
    b = make_seq("b", [1, 2, 3, 4, 0, 6, 7, 8, 9])
    bm.match_prefix(b)
    assert b.num_computed_tokens == 4
    c = make_seq("c", [9, 2, 3, 4, 5, 6, 7, 8, 9])
    bm.match_prefix(c)
    assert c.num_computed_tokens == 0  # same second block, different first: the chain differs


def test_hash_collision_is_caught_by_token_verification():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_seq("a", [1, 2, 3, 4, 5])
    _prefill(bm, a)
    block = bm.blocks[a.block_table[0]]
    block.token_ids = (9, 9, 9, 9)  # simulate a colliding entry holding other tokens
    b = make_seq("b", [1, 2, 3, 4, 5])
    bm.match_prefix(b)
    assert b.num_computed_tokens == 0


def test_freed_cached_blocks_are_reused_then_evicted_lru():
    bm = BlockManager(num_blocks=4, block_size=2)
    a = make_seq("a", [1, 2, 3, 4, 5])
    _prefill(bm, a)  # 3 blocks, 2 full and cached
    bm.free(a)
    assert bm.num_free_blocks == 4 and bm.usage == 0.0
    again = make_seq("again", [1, 2, 3, 4, 5])
    bm.match_prefix(again)  # still cached while free
    assert again.num_computed_tokens == 4
    bm.free(again)
    # Fill the cache with other tokens: every old entry must be evicted, none served stale.
    other = make_seq("other", [7, 7, 7, 7, 7, 7, 7, 7])
    _prefill(bm, other)
    assert bm.num_free_blocks == 0
    bm.free(other)
    late = make_seq("late", [1, 2, 3, 4, 5])
    bm.match_prefix(late)
    assert late.num_computed_tokens == 0
    assert len(bm.cached) == 4  # only the four full blocks of "other" remain


def test_lru_evicts_least_recently_freed_first():
    bm = BlockManager(num_blocks=4, block_size=2)
    old, new = make_seq("old", [1, 2, 3]), make_seq("new", [5, 6, 7])
    _prefill(bm, old)
    _prefill(bm, new)
    bm.free(old)
    bm.free(new)
    taker = make_seq("t", [9, 9])  # needs one block: takes the oldest free one
    bm.allocate(taker, 2)
    probe_new = make_seq("pn", [5, 6, 7])
    bm.match_prefix(probe_new)
    assert probe_new.num_computed_tokens == 2  # the newer cached block survived


def test_share_prompt_blocks_forks_without_recompute():
    bm = BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=False)
    leader = make_seq("l", list(range(10)))
    bm.allocate(leader, 10)
    leader.num_computed_tokens = 10
    child = make_seq("c", list(range(10)), leader=leader)
    bm.share_prompt_blocks(child, leader)
    assert child.block_table == leader.block_table[:2]
    assert child.num_computed_tokens == 8
    bm.free(leader)
    bm.free(child)
    assert bm.num_free_blocks == 16
