"""KV block bookkeeping: free list, reference counts and the prefix-cache hash map.

This module touches no tensors. A block id indexes the paged KV pool in `kv_cache.py`;
token `i` of a sequence lives in slot `block_table[i // kv_block_size] * kv_block_size +
i % kv_block_size`.

Prefix caching: once every slot of a block holds computed K/V, the block gets a hash of
its tokens chained with the hash of the block before it, so equal hashes mean equal
prefixes. A new sequence whose leading full blocks hash the same reuses them by
reference count. Blocks whose count falls to zero go to the back of the free list but
keep their hash, so a later request can still hit them. Allocation takes from the front,
which evicts the least recently freed cached block first.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

from molten.engine.sequence import Sequence

logger = logging.getLogger(__name__)


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None
    token_ids: tuple[int, ...] = ()
    """Tokens the hash covers, compared on a hit so a hash collision cannot mix prefixes."""


ROOT_PARENT_HASH = -1
"""Parent hash of a sequence's first block. CPython's hash() never returns -1, so no real
parent hash can equal it. It is an int because before Python 3.12 `hash(None)` depends on
None's address, which differs between the prefill and decode processes."""


def chain_hash(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
    """Hash a block's tokens with its parent's hash (None for the first block).

    The result is the same in every process: hash() of ints and tuples of ints takes no
    per-process salt.
    """
    return hash((ROOT_PARENT_HASH if parent_hash is None else parent_hash, token_ids))


@dataclass
class PrefixCacheStats:
    num_queried_tokens: int = 0
    num_hit_tokens: int = 0

    @property
    def hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_queried_tokens if self.num_queried_tokens else 0.0


class BlockManager:
    def __init__(self, num_blocks: int, kv_block_size: int, enable_prefix_caching: bool = True):
        self.kv_block_size = kv_block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Insertion order is eviction order: the first entry is the least recently freed.
        self.free_block_ids: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.hash_to_block_id: dict[int, int] = {}
        self.prefix_stats = PrefixCacheStats()

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    @property
    def num_cached_free_blocks(self) -> int:
        return sum(1 for i in self.free_block_ids if self.blocks[i].block_hash is not None)

    # -- allocation ---------------------------------------------------------------------

    def _take_free_block(self) -> Block:
        block_id, _ = self.free_block_ids.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:
            # Evict: the block's old contents are about to be overwritten.
            if self.hash_to_block_id.get(block.block_hash) == block_id:
                del self.hash_to_block_id[block.block_hash]
            block.block_hash = None
            block.token_ids = ()
        block.ref_count = 1
        return block

    def _ref_block(self, block: Block) -> None:
        if block.ref_count == 0:
            del self.free_block_ids[block.block_id]
        block.ref_count += 1

    def match_prefix(self, seq: Sequence) -> int:
        """Attach cached blocks for the sequence's leading full blocks; return the cached token count.

        The last token is never taken from the cache: its logits are needed to sample, so
        at least one token is always computed.
        """
        if seq.block_table:
            raise RuntimeError(f"sequence {seq.seq_id} already has blocks")
        if not self.enable_prefix_caching:
            return 0
        num_full_blocks = (seq.num_tokens - 1) // self.kv_block_size
        parent_hash = None
        for index in range(num_full_blocks):
            tokens = tuple(seq.block_tokens(index, self.kv_block_size))
            block_hash = chain_hash(parent_hash, tokens)
            block_id = self.hash_to_block_id.get(block_hash)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            self._ref_block(self.blocks[block_id])
            seq.block_table.append(block_id)
            parent_hash = block_hash
        num_cached = len(seq.block_table) * self.kv_block_size
        self.prefix_stats.num_queried_tokens += seq.num_tokens
        self.prefix_stats.num_hit_tokens += num_cached
        return num_cached

    def num_blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        num_required = seq.num_blocks_for(seq.num_computed_tokens + num_new_tokens, self.kv_block_size)
        return max(0, num_required - len(seq.block_table))

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_free_blocks

    def allocate_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Grow the block table to hold `num_new_tokens` more tokens; False (and no change) if memory is short."""
        num_needed = self.num_blocks_needed(seq, num_new_tokens)
        if num_needed > self.num_free_blocks:
            return False
        for _ in range(num_needed):
            seq.block_table.append(self._take_free_block().block_id)
        return True

    def allocate_block(self) -> int | None:
        """Take one free block (evicting its cached contents); None when none is free."""
        if not self.free_block_ids:
            return None
        return self._take_free_block().block_id

    def free(self, seq: Sequence) -> None:
        """Drop the sequence's references. Blocks that reach zero stay cached until evicted."""
        self._release(seq.block_table)
        seq.block_table.clear()

    def trim(self, seq: Sequence, num_tokens: int) -> int:
        """Free the blocks past the first `num_tokens` tokens (rejected drafts' slots); return how many.

        A trailing block never carries a prefix-cache hash here, because blocks are
        hashed only once full of computed tokens, and the computed tokens of a sequence
        are rolled back to the accepted ones before any hashing.
        """
        num_keep = seq.num_blocks_for(num_tokens, self.kv_block_size)
        trailing = seq.block_table[num_keep:]
        if trailing:
            self._release(trailing)
            del seq.block_table[num_keep:]
        return len(trailing)

    def _release(self, block_ids: list[int]) -> None:
        # Reversed, so a sequence's tail blocks sit ahead of its head blocks in eviction
        # order: the head is the part another request is most likely to share.
        for block_id in reversed(block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count < 0:
                raise RuntimeError(f"block {block_id} freed more often than referenced")
            if block.ref_count == 0:
                if block.block_hash is None:
                    # Uncached blocks go first in line: nothing is lost by reusing them.
                    self.free_block_ids[block_id] = None
                    self.free_block_ids.move_to_end(block_id, last=False)
                else:
                    self.free_block_ids[block_id] = None

    # -- prefix-cache registration ------------------------------------------------------

    def register_full_blocks(self, seq: Sequence, num_computed_before: int) -> None:
        """Hash blocks that became full of computed tokens in the last step."""
        if not self.enable_prefix_caching:
            return
        first = num_computed_before // self.kv_block_size
        last = seq.num_computed_tokens // self.kv_block_size
        parent_hash = self.blocks[seq.block_table[first - 1]].block_hash if first > 0 else None
        if first > 0 and parent_hash is None:
            # An earlier block has no hash (imported from an engine without prefix
            # caching). Chaining from None would file this block as a prompt's first block.
            return
        for index in range(first, last):
            block = self.blocks[seq.block_table[index]]
            tokens = tuple(seq.block_tokens(index, self.kv_block_size))
            block_hash = chain_hash(parent_hash, tokens)
            if block.block_hash is None:
                block.block_hash = block_hash
                block.token_ids = tokens
                # If another block already holds this prefix, keep that mapping: both are valid.
                self.hash_to_block_id.setdefault(block_hash, block.block_id)
            parent_hash = block_hash

    def register_imported_blocks(self, block_ids: list[int], block_hashes: list[int | None], token_chunks: list[tuple[int, ...]]) -> None:
        """Record the hashes of blocks imported from another worker."""
        if not self.enable_prefix_caching:
            return
        for block_id, block_hash, tokens in zip(block_ids, block_hashes, token_chunks):
            if block_hash is None:
                continue
            block = self.blocks[block_id]
            block.block_hash = block_hash
            block.token_ids = tokens
            self.hash_to_block_id.setdefault(block_hash, block_id)

    def lookup_cached_block(self, block_hash: int, tokens: tuple[int, ...]) -> int | None:
        block_id = self.hash_to_block_id.get(block_hash)
        if block_id is None or self.blocks[block_id].token_ids != tokens:
            return None
        return block_id

    def ref_cached_block(self, block_id: int) -> None:
        self._ref_block(self.blocks[block_id])

    # -- checks -------------------------------------------------------------------------

    def check_invariants(self, live_sequences: list[Sequence]) -> None:
        """Raise if any block is unaccounted for: refs must equal the block tables that name it."""
        expected = [0] * self.num_blocks
        for seq in live_sequences:
            for block_id in seq.block_table:
                expected[block_id] += 1
        for block in self.blocks:
            if block.ref_count != expected[block.block_id]:
                raise RuntimeError(
                    f"block {block.block_id} has ref_count {block.ref_count} but {expected[block.block_id]} owners"
                )
            is_free = block.block_id in self.free_block_ids
            if is_free != (block.ref_count == 0):
                raise RuntimeError(f"block {block.block_id} free-list membership disagrees with ref_count")

    @property
    def num_saved_blocks(self) -> int:
        """Blocks that sharing saves now: each extra reference to a block would otherwise be a copy."""
        return sum(block.ref_count - 1 for block in self.blocks if block.ref_count > 1)

    def snapshot(self) -> dict:
        return {
            "num_shared_blocks": sum(1 for block in self.blocks if block.ref_count > 1),
            "num_saved_blocks": self.num_saved_blocks,
            "num_blocks": self.num_blocks,
            "num_free_blocks": self.num_free_blocks,
            "num_cached_free_blocks": self.num_cached_free_blocks,
            # Free blocks that still hold a prefix-cache entry: reusable until evicted.
            "cached_free_block_ids": [i for i in self.free_block_ids if self.blocks[i].block_hash is not None],
            "kv_block_size": self.kv_block_size,
            "prefix_cache_hit_rate": round(self.prefix_stats.hit_rate, 4),
        }
