"""BlockManager bookkeeping: reference counts, prefix hashes, eviction order, invariants."""

from __future__ import annotations

import subprocess
import sys

import pytest

from molten.engine.block_manager import BlockManager, chain_hash
from molten.engine.sampling_params import SamplingParams
from molten.engine.sequence import Sequence

KV_BLOCK_SIZE = 4


def make_seq(token_ids: list[int], request_id: str = "req") -> Sequence:
    return Sequence(request_id=request_id, token_ids=list(token_ids), num_prompt_tokens=len(token_ids), sampling_params=SamplingParams())


def admit(manager: BlockManager, seq: Sequence) -> int:
    """Match the prefix cache, allocate the rest and mark every token computed, as one prefill step would."""
    cached = manager.match_prefix(seq)
    seq.num_computed_tokens = cached
    assert manager.allocate_slots(seq, seq.num_uncomputed_tokens)
    seq.num_computed_tokens = seq.num_tokens
    manager.register_full_blocks(seq, cached)
    return cached


def block_state(manager: BlockManager) -> tuple:
    return (
        list(manager.free_block_ids),
        [(b.ref_count, b.block_hash, b.token_ids) for b in manager.blocks],
        dict(manager.hash_to_block_id),
    )


def test_shared_prefix_ref_counts():
    manager = BlockManager(num_blocks=8, kv_block_size=KV_BLOCK_SIZE)
    first = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9], "first")
    second = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 10, 11], "second")

    admit(manager, first)
    cached = admit(manager, second)

    assert cached == 8
    assert first.block_table[:2] == second.block_table[:2]
    assert [manager.blocks[b].ref_count for b in first.block_table] == [2, 2, 1]
    assert manager.blocks[second.block_table[2]].ref_count == 1
    manager.check_invariants([first, second])

    manager.free(first)
    assert [manager.blocks[b].ref_count for b in second.block_table] == [1, 1, 1]
    manager.check_invariants([second])

    manager.free(second)
    assert manager.num_free_blocks == manager.num_blocks
    assert all(block.ref_count == 0 for block in manager.blocks)
    manager.check_invariants([])


def test_last_token_never_comes_from_cache():
    manager = BlockManager(num_blocks=8, kv_block_size=KV_BLOCK_SIZE)
    admit(manager, make_seq([1, 2, 3, 4, 5, 6, 7, 8], "first"))
    same = make_seq([1, 2, 3, 4, 5, 6, 7, 8], "same")

    cached = manager.match_prefix(same)

    # Two full blocks are cached, but the last token's logits are needed, so one block is recomputed.
    assert cached == 4


def test_chain_hash_depends_on_prefix():
    tokens = (5, 6, 7, 8)

    assert chain_hash(None, tokens) != chain_hash(chain_hash(None, (1, 2, 3, 4)), tokens)
    assert chain_hash(chain_hash(None, (1, 2, 3, 4)), tokens) != chain_hash(chain_hash(None, (9, 2, 3, 4)), tokens)
    assert chain_hash(chain_hash(None, (1, 2, 3, 4)), tokens) == chain_hash(chain_hash(None, (1, 2, 3, 4)), tokens)


def test_same_block_after_other_prefix_misses():
    manager = BlockManager(num_blocks=8, kv_block_size=KV_BLOCK_SIZE)
    admit(manager, make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9], "first"))
    other_prefix = make_seq([9, 9, 9, 9, 5, 6, 7, 8, 9], "other")

    assert manager.match_prefix(other_prefix) == 0
    assert other_prefix.block_table == []


def test_chain_hash_is_stable_across_processes():
    """Prefill and decode workers run in different processes and compare these hashes."""
    # Importing block_manager runs no torch code (sequence.py calls torch only inside a
    # function), so an empty stand-in module saves each child the seconds torch takes to import.
    code = (
        "import sys, types; sys.modules['torch'] = types.ModuleType('torch'); "
        "from molten.engine.block_manager import chain_hash; "
        "print(chain_hash(chain_hash(None, (1, 2, 3)), (4, 5)))"
    )
    values = [
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
        for _ in range(2)
    ]

    assert values[0] == values[1]
    assert values[0] == str(chain_hash(chain_hash(None, (1, 2, 3)), (4, 5)))


def test_eviction_takes_uncached_then_least_recently_freed():
    manager = BlockManager(num_blocks=6, kv_block_size=KV_BLOCK_SIZE)
    older = make_seq([1, 2, 3, 4, 5], "older")  # one full block (cached) + one partial
    newer = make_seq([6, 7, 8, 9, 10], "newer")
    admit(manager, older)
    admit(manager, newer)
    older_full, older_partial = older.block_table
    newer_full, newer_partial = newer.block_table
    manager.free(older)
    manager.free(newer)

    # Uncached partial blocks go first (most recently freed first), then the blocks
    # never used, then cached blocks, least recently freed first.
    order = [manager.allocate_block() for _ in range(6)]

    assert order == [newer_partial, older_partial, 4, 5, older_full, newer_full]


def test_eviction_drops_hash_of_oldest_cached_block():
    manager = BlockManager(num_blocks=3, kv_block_size=KV_BLOCK_SIZE)
    older = make_seq([1, 2, 3, 4, 99], "older")
    newer = make_seq([5, 6, 7, 8, 99], "newer")
    admit(manager, older)
    manager.free(older)
    admit(manager, newer)
    manager.free(newer)

    # All three blocks are free: one uncached partial, then "older", then "newer".
    filler = make_seq(list(range(100, 108)), "filler")
    assert manager.allocate_slots(filler, 8)

    assert manager.match_prefix(make_seq([1, 2, 3, 4, 50], "older-again")) == 0
    assert manager.match_prefix(make_seq([5, 6, 7, 8, 50], "newer-again")) == 4


def test_free_puts_head_blocks_last_in_eviction_order():
    manager = BlockManager(num_blocks=4, kv_block_size=KV_BLOCK_SIZE)
    seq = make_seq(list(range(1, 14)), "long")  # three full blocks and one partial
    admit(manager, seq)
    head, middle, tail, partial = seq.block_table

    manager.free(seq)

    assert list(manager.free_block_ids) == [partial, tail, middle, head]


def test_allocate_slots_short_has_no_side_effects():
    manager = BlockManager(num_blocks=4, kv_block_size=KV_BLOCK_SIZE)
    holder = make_seq(list(range(1, 10)), "holder")  # takes three blocks
    admit(manager, holder)
    seq = make_seq([20, 21, 22, 23, 24, 25], "short")
    before = block_state(manager)

    assert manager.allocate_slots(seq, 6) is False

    assert seq.block_table == []
    assert block_state(manager) == before
    manager.check_invariants([holder])


def test_allocate_block_returns_none_when_empty():
    manager = BlockManager(num_blocks=2, kv_block_size=KV_BLOCK_SIZE)

    assert manager.allocate_block() is not None
    assert manager.allocate_block() is not None
    assert manager.allocate_block() is None


def test_check_invariants_catches_corrupted_ref_count():
    manager = BlockManager(num_blocks=4, kv_block_size=KV_BLOCK_SIZE)
    seq = make_seq([1, 2, 3, 4, 5], "seq")
    admit(manager, seq)
    manager.check_invariants([seq])

    manager.blocks[seq.block_table[0]].ref_count += 1

    with pytest.raises(RuntimeError, match="ref_count"):
        manager.check_invariants([seq])


def test_check_invariants_catches_leaked_block():
    manager = BlockManager(num_blocks=4, kv_block_size=KV_BLOCK_SIZE)
    seq = make_seq([1, 2, 3, 4, 5], "seq")
    admit(manager, seq)

    with pytest.raises(RuntimeError, match="owners"):
        manager.check_invariants([])


def test_check_invariants_catches_free_list_disagreement():
    manager = BlockManager(num_blocks=4, kv_block_size=KV_BLOCK_SIZE)
    seq = make_seq([1, 2, 3, 4, 5], "seq")
    admit(manager, seq)

    manager.free_block_ids[seq.block_table[0]] = None

    with pytest.raises(RuntimeError, match="free-list"):
        manager.check_invariants([seq])


def test_double_free_raises():
    manager = BlockManager(num_blocks=4, kv_block_size=KV_BLOCK_SIZE)
    seq = make_seq([1, 2, 3], "seq")
    admit(manager, seq)
    block_table = list(seq.block_table)
    manager.free(seq)
    seq.block_table = block_table

    with pytest.raises(RuntimeError, match="freed more often"):
        manager.free(seq)


def test_prefix_hit_rate_counts_hits():
    manager = BlockManager(num_blocks=8, kv_block_size=KV_BLOCK_SIZE)
    admit(manager, make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9], "first"))
    admit(manager, make_seq([1, 2, 3, 4, 5, 6, 7, 8, 10], "second"))

    assert manager.prefix_stats.num_queried_tokens == 18
    assert manager.prefix_stats.num_hit_tokens == 8
    assert manager.prefix_stats.hit_rate == pytest.approx(8 / 18)


def test_prefix_caching_off_never_hits():
    manager = BlockManager(num_blocks=8, kv_block_size=KV_BLOCK_SIZE, enable_prefix_caching=False)
    first = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9], "first")
    second = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9], "second")
    admit(manager, first)

    assert admit(manager, second) == 0
    assert set(first.block_table).isdisjoint(second.block_table)
    assert manager.hash_to_block_id == {}


def test_block_after_unhashed_block_stays_unhashed():
    manager = BlockManager(num_blocks=4, kv_block_size=KV_BLOCK_SIZE)
    seq = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], "imported")
    assert manager.allocate_slots(seq, 12)
    seq.num_computed_tokens = 12  # blocks 0 and 1 were imported without hashes

    manager.register_full_blocks(seq, num_computed_before=8)

    assert manager.blocks[seq.block_table[2]].block_hash is None
    assert manager.match_prefix(make_seq([9, 10, 11, 12, 13], "follower")) == 0
