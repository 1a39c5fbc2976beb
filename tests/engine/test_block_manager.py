"""BlockManager: allocation and growth, freeing, prefix sharing and LRU eviction, and the integrity check
after long random walks of operations."""

import random

import pytest

from quantlab.engine.block_manager import BlockManager, block_key
from quantlab.engine.sequence import Sequence

TPB = 4


def admit(bm: BlockManager, seq: Sequence, num_tokens: int | None = None) -> list[int]:
    matched = bm.match_prefix(seq)
    bm.allocate(seq, matched, seq.num_tokens if num_tokens is None else num_tokens)
    return matched


def compute_all(bm: BlockManager, seq: Sequence) -> None:
    seq.num_computed_tokens = seq.num_tokens
    bm.cache_computed(seq)


def test_allocation_covers_requested_slots_and_grows_one_block_per_boundary():
    bm = BlockManager(8, TPB)
    seq = Sequence("a", range(6))
    admit(bm, seq)
    assert len(seq.block_table) == 2 and bm.num_free_blocks == 6
    for n, blocks in [(7, 2), (8, 2), (9, 3), (12, 3), (13, 4)]:
        assert bm.grow(seq, n)
        assert len(seq.block_table) == blocks
        bm.check_integrity()
    assert len(set(seq.block_table)) == 4


def test_grow_refuses_without_changing_anything_when_pool_is_short():
    bm = BlockManager(3, TPB)
    seq = Sequence("a", range(8))
    admit(bm, seq)
    table = list(seq.block_table)
    assert not bm.grow(seq, 4 * TPB)
    assert seq.block_table == table and bm.num_free_blocks == 1
    bm.check_integrity()


def test_blocks_all_returned_after_free():
    bm = BlockManager(10, TPB, enable_prefix_caching=False)
    seqs = [Sequence(str(i), range(5 * i + 1)) for i in range(1, 4)]
    for seq in seqs:
        admit(bm, seq)
    assert bm.usage > 0
    for seq in seqs:
        bm.free(seq)
        assert seq.block_table == [] and seq.num_computed_tokens == 0
    assert bm.num_free_blocks == 10 and bm.usage == 0
    bm.check_integrity()


def test_prefix_shared_by_full_blocks_only_and_never_the_last_token():
    bm = BlockManager(16, TPB)
    first = Sequence("a", range(10))  # blocks [0-3] [4-7] full, [8-9] partial
    admit(bm, first)
    compute_all(bm, first)
    second = Sequence("b", list(range(10)) + [99])
    assert admit(bm, second) == first.block_table[:2]
    assert second.num_computed_tokens == second.num_cached_tokens == 2 * TPB
    assert bm.ref_counts[first.block_table[0]] == 2
    exact = Sequence("c", range(8))  # exactly two full blocks: the last one must be recomputed
    assert admit(bm, exact) == first.block_table[:1]
    assert bm.prefix_hits == 2 * TPB + TPB and bm.prefix_queries == 10 + 11 + 8
    bm.check_integrity()


def test_prefix_match_requires_the_whole_prefix_not_just_the_block():
    bm = BlockManager(16, TPB)
    first = Sequence("a", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    admit(bm, first)
    compute_all(bm, first)
    same_second_block = Sequence("b", [0, 2, 3, 4, 5, 6, 7, 8, 9])
    assert bm.match_prefix(same_second_block) == []
    assert block_key(b"", [1, 2, 3, 4]) == block_key(b"", [1, 2, 3, 4]) != block_key(b"x", [1, 2, 3, 4])


def test_finished_prefix_stays_cached_and_is_reused_until_evicted_lru_first():
    bm = BlockManager(4, TPB)
    old = Sequence("old", range(9))  # 3 blocks, 2 full
    admit(bm, old)
    compute_all(bm, old)
    bm.free(old)
    assert bm.num_free_blocks == 4 and bm.usage == 0
    again = Sequence("again", range(9))
    assert admit(bm, again) == [0, 1]  # taken back from the cache, not recomputed
    bm.free(again)
    # 3 fresh blocks: the two free ones, then the old prefix's tail block is evicted before its parent.
    other = Sequence("other", [100 + t for t in range(3 * TPB)])
    admit(bm, other)
    assert bm.match_prefix(Sequence("probe", range(9))) == [0]
    bm.check_integrity()


def test_disabled_prefix_caching_never_matches():
    bm = BlockManager(8, TPB, enable_prefix_caching=False)
    first = Sequence("a", range(9))
    admit(bm, first)
    compute_all(bm, first)
    assert bm.match_prefix(Sequence("b", range(9))) == []


def test_integrity_check_catches_a_corrupted_ref_count():
    bm = BlockManager(4, TPB)
    seq = Sequence("a", range(5))
    admit(bm, seq)
    bm.ref_counts[seq.block_table[0]] += 1
    with pytest.raises(AssertionError, match="ref count"):
        bm.check_integrity()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_integrity_holds_after_every_step_of_a_random_walk(seed):
    rng = random.Random(seed)
    bm = BlockManager(24, TPB, enable_prefix_caching=seed != 2)
    prompts = [[rng.randrange(5) for _ in range(rng.randrange(1, 14))] for _ in range(6)]  # shared prefixes
    live: list[Sequence] = []
    for step in range(600):
        op = rng.random()
        if op < 0.35:
            seq = Sequence(f"s{step}", rng.choice(prompts) + [rng.randrange(5) for _ in range(rng.randrange(3))])
            matched = bm.match_prefix(seq)
            target = seq.num_tokens + rng.randrange(4)
            if bm.can_allocate(matched, target):
                bm.allocate(seq, matched, target)
                live.append(seq)
        elif op < 0.75 and live:
            seq = rng.choice(live)
            seq.num_computed_tokens = seq.num_tokens
            bm.cache_computed(seq)
            seq.token_ids.append(rng.randrange(5))
            if not bm.grow(seq, seq.num_tokens):
                bm.free(seq)
                live.remove(seq)
        elif live:
            seq = live.pop(rng.randrange(len(live)))
            bm.free(seq)
        bm.check_integrity()
    assert bm.prefix_hits > 0 or seed == 2
