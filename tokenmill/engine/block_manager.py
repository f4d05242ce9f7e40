"""KV block manager: owns the paged cache's blocks; sequences own block tables.

Blocks are reference-counted. A block whose count drops to 0 goes to the back of the free queue but keeps
its prefix-cache entry until it is reused, so the free queue doubles as the LRU eviction order. A full
block's key chains the previous block's key with its token ids; a hit is verified against the stored
tokens so a hash collision can never serve the wrong KV.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from tokenmill.engine.sequence import Sequence
from tokenmill.intmath import cdiv


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None  # set once the block is full and registered in the prefix cache
    token_ids: tuple[int, ...] = ()


def chain_hash(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
    # Tuples of ints hash deterministically in CPython (no per-process salt, unlike str).
    return hash((parent_hash, token_ids))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block; got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks in LRU order (front = evicted first). Values unused: an ordered set.
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, int] = {}  # block hash -> block id
        self.prefix_cache_queries = 0  # prompt tokens looked up
        self.prefix_cache_hits = 0  # prompt tokens found

    # ---- accounting -------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by live sequences (cached-but-free blocks count as free)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    # ---- allocation -------------------------------------------------------------------------------
    def _take_free_block(self) -> int:
        block_id, _ = self.free_queue.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:  # evict its prefix-cache entry: the contents will be overwritten
            if self.cached.get(block.block_hash) == block_id:
                del self.cached[block.block_hash]
            block.block_hash, block.token_ids = None, ()
        block.ref_count = 1
        return block_id

    def _acquire(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_queue[block_id]
        block.ref_count += 1

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        needed = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        return needed <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Grow ``seq.block_table`` to hold ``num_computed_tokens + num_new_tokens`` tokens."""
        needed = self.blocks_needed(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        if needed > self.num_free_blocks:
            raise RuntimeError(f"allocate() called without room: need {needed}, free {self.num_free_blocks}")
        for _ in range(needed):
            seq.block_table.append(self._take_free_block())

    def free(self, seq: Sequence) -> None:
        """Release all of a sequence's blocks. Tail blocks are queued first so they are evicted first."""
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[block_id] = None
        seq.block_table = []
        seq.block_hashes = []
        seq.num_computed_tokens = 0
        seq.num_sent_blocks = 0

    def free_tail(self, seq: Sequence) -> None:
        """Rollback: release the blocks past ``num_computed_tokens`` (they held only rejected tokens' KV). Such a
        block was never registered in the prefix cache, which only hashes blocks of computed, accepted tokens."""
        keep = self.blocks_needed(seq.num_computed_tokens)
        if len(seq.block_table) <= keep:
            return
        for block_id in reversed(seq.block_table[keep:]):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_queue[block_id] = None
        del seq.block_table[keep:]
        seq.num_sent_blocks = min(seq.num_sent_blocks, keep)

    # ---- prefix sharing -----------------------------------------------------------------------------
    def _max_shareable_blocks(self, seq: Sequence) -> int:
        # At least one prompt token must be computed so the step yields logits to sample from.
        return (seq.num_tokens - 1) // self.block_size

    def match_prefix(self, seq: Sequence) -> None:
        """Point a fresh sequence at cached blocks holding its leading full blocks; counts queries/hits."""
        if not self.enable_prefix_caching or seq.block_table:
            return
        parent: int | None = None
        self.prefix_cache_queries += seq.num_tokens
        for i in range(self._max_shareable_blocks(seq)):
            tokens = tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            key = chain_hash(parent, tokens)
            block_id = self.cached.get(key)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            self._acquire(block_id)
            seq.block_table.append(block_id)
            seq.block_hashes.append(key)
            parent = key
        seq.num_computed_tokens = len(seq.block_table) * self.block_size
        seq.num_cached_tokens = seq.num_computed_tokens
        self.prefix_cache_hits += seq.num_computed_tokens

    def share_prompt_blocks(self, seq: Sequence, source: Sequence) -> None:
        """Fork: a fresh sequence with the same prompt reuses ``source``'s full prompt blocks."""
        if seq.block_table:
            return
        computed_full = min(source.num_computed_tokens, source.prompt_len) // self.block_size
        count = min(computed_full, len(source.block_table), self._max_shareable_blocks(seq))
        for block_id in source.block_table[:count]:
            self._acquire(block_id)
            seq.block_table.append(block_id)
        seq.block_hashes = list(source.block_hashes[:count])
        seq.num_computed_tokens = count * self.block_size
        seq.num_cached_tokens = seq.num_computed_tokens

    def cache_full_blocks_of(self, seqs: Iterable[Sequence]) -> None:
        """``cache_full_blocks`` for each sequence, in order; one call per step for every row, so the rows
        without a newly full block (15 of 16 decode steps) cost one comparison each."""
        if not self.enable_prefix_caching:
            return
        block_size = self.block_size
        for seq in seqs:
            if min(seq.num_computed_tokens, len(seq.token_ids)) >= (len(seq.block_hashes) + 1) * block_size:
                self.cache_full_blocks(seq)

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register blocks that became full (all tokens computed and accepted) in the prefix cache. Call it after a
        rollback lowered ``num_computed_tokens``: draft tokens never enter ``token_ids``, and a block is hashed
        only over ids there."""
        if not self.enable_prefix_caching:
            return
        num_full = min(seq.num_computed_tokens, len(seq.token_ids)) // self.block_size
        num_full = min(num_full, len(seq.block_table))
        parent = seq.block_hashes[-1] if seq.block_hashes else None
        for i in range(len(seq.block_hashes), num_full):
            tokens = tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            key = chain_hash(parent, tokens)
            block = self.blocks[seq.block_table[i]]
            if key not in self.cached and block.block_hash is None:
                block.block_hash, block.token_ids = key, tokens
                self.cached[key] = block.block_id
            seq.block_hashes.append(key)
            parent = key
