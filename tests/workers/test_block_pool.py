"""BlockPool and KVCacheManager: exact block ids, shortage, double free and integrity checks."""

from __future__ import annotations

import random

import numpy as np
import pytest

from workers.block_pool import BlockPool


def test_allocate_hands_out_ids_in_order() -> None:
    pool = BlockPool(11)
    assert pool.allocate(3) == [0, 1, 2]
    assert pool.allocate(2) == [3, 4]
    assert (pool.num_used, pool.num_free) == (5, 6)
    assert pool.usage == 5 / 11


def test_freed_ids_go_to_the_back_of_the_free_list() -> None:
    pool = BlockPool(11)
    pool.allocate(5)
    pool.free([1, 3])
    assert pool.allocate(6) == [5, 6, 7, 8, 9, 10]
    assert pool.allocate(2) == [1, 3]
    assert pool.num_free == 0
    pool.check_integrity()


def test_shortage_returns_none_and_takes_nothing() -> None:
    pool = BlockPool(4)
    assert pool.allocate(1) == [0]
    assert pool.allocate(4) is None
    assert pool.num_free == 3
    assert pool.allocate(3) == [1, 2, 3]
    assert pool.allocate(1) is None
    assert pool.allocate(0) == []
    pool.check_integrity()


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="num_blocks must be >= 1"):
        BlockPool(0)
    with pytest.raises(ValueError, match="cannot allocate -1 blocks"):
        BlockPool(2).allocate(-1)


def test_double_free_raises() -> None:
    pool = BlockPool(4)
    pool.allocate(2)
    pool.free([1])
    with pytest.raises(ValueError, match="block 1 freed while not allocated"):
        pool.free([1])
    with pytest.raises(ValueError, match="block 3 freed while not allocated"):
        pool.free([3])
    pool.check_integrity()


def test_check_integrity_passes_on_a_consistent_pool() -> None:
    pool = BlockPool(6)
    pool.allocate(4)
    pool.free([2, 0])
    pool.check_integrity()


def test_check_integrity_catches_a_used_block_in_the_free_list() -> None:
    pool = BlockPool(6)
    pool.allocate(2)
    pool._freed.append(1)  # an entry the pool did not make (its mark is not set)
    with pytest.raises(AssertionError, match="block 1: marked 0, in the free list=True"):
        pool.check_integrity()


def test_check_integrity_catches_a_free_block_missing_from_the_free_list() -> None:
    pool = BlockPool(6)
    pool.allocate(6)
    pool.free([4, 2])
    pool._freed.remove(4)
    with pytest.raises(AssertionError, match="block 4: ref count 0, not in the free list"):
        pool.check_integrity()


def test_check_integrity_catches_a_duplicate_in_the_free_list() -> None:
    pool = BlockPool(6)
    pool._freed.append(5)
    with pytest.raises(AssertionError, match="in the free list twice"):
        pool.check_integrity()


def test_check_integrity_catches_a_negative_ref_count() -> None:
    pool = BlockPool(6)
    pool._ref_counts[3] = -1
    with pytest.raises(AssertionError, match="block 3 has ref count -1"):
        pool.check_integrity()


def test_check_integrity_catches_a_wrong_free_count() -> None:
    pool = BlockPool(6)
    pool.allocate(2)
    pool._num_free += 1
    with pytest.raises(AssertionError, match="num_free is 5, but 4 ids have ref count 0"):
        pool.check_integrity()


def test_reserve_leaves_stale_entries_that_allocate_skips() -> None:
    pool = BlockPool(6)
    pool.reserve([1, 3, 3])
    assert (pool.num_free, pool.ref_counts()) == (4, [0, 1, 0, 2, 0, 0])
    pool.check_integrity()
    assert pool.allocate(5) is None
    assert pool.allocate(4) == [0, 2, 4, 5]
    pool.free([3, 3, 1])  # their entries were skipped: they go to the back
    assert pool.allocate(2) == [3, 1]
    pool.check_integrity()


def test_an_id_reserved_and_freed_before_its_turn_keeps_its_place() -> None:
    """The one departure from first-in first-out (BlockPool's docstring)."""
    pool = BlockPool(6)
    pool.allocate(1)
    pool.reserve([4])
    pool.free([0, 4])
    pool.check_integrity()
    assert pool.allocate(6) == [1, 2, 3, 4, 5, 0]


def test_grow_appends_after_the_freed_ids() -> None:
    fresh = BlockPool(2)
    fresh.grow(2)
    assert fresh.allocate(4) == [0, 1, 2, 3]
    pool = BlockPool(4)
    pool.allocate(4)
    pool.free([1])
    pool.grow(2)
    assert (pool.num_blocks, pool.num_free) == (6, 3)
    pool.check_integrity()
    assert pool.allocate(3) == [1, 4, 5]


def test_ref_count_array_is_a_copy_of_the_counts() -> None:
    pool = BlockPool(5)
    pool.allocate(2)
    pool.reserve([1, 4])
    counts = pool.ref_count_array()
    assert counts.dtype == np.int64 and counts.tolist() == [1, 2, 0, 0, 1]
    counts[0] = 7
    pool.grow(1)  # no buffer is left exported: the pool can still resize
    assert pool.ref_counts() == [1, 2, 0, 0, 1, 0]


def test_random_operations_keep_the_pool_consistent_with_a_model() -> None:
    """Allocate, free, reserve, grow, evacuate and shrink in a random order against a plain
    dict of reference counts: no id is handed out twice, counts and free counts agree, and
    every integrity check passes."""
    rng = random.Random(5)
    pool, model = BlockPool(40), dict.fromkeys(range(40), 0)
    held: list[int] = []
    for _ in range(3000):
        op = rng.random()
        if op < 0.35:
            ids = pool.allocate(rng.randint(0, 6))
            if ids is not None:
                assert all(model[i] == 0 for i in ids) and len(set(ids)) == len(ids)
                for i in ids:
                    model[i] = 1
                held += ids
        elif op < 0.65 and held:
            rng.shuffle(held)
            n = rng.randint(1, min(5, len(held)))
            gone, held = held[:n], held[n:]
            pool.free(gone)
            for i in gone:
                model[i] -= 1
        elif op < 0.8:
            ids = rng.sample(range(pool.num_blocks), rng.randint(0, 4))
            pool.reserve(ids)
            for i in ids:
                model[i] += 1
            held += ids
        elif op < 0.87:
            n = rng.randint(0, 5)
            pool.grow(n)
            model.update(dict.fromkeys(range(pool.num_blocks - n, pool.num_blocks), 0))
        elif op < 0.94 and pool.num_blocks > 8:
            lo = pool.num_blocks - rng.randint(1, 4)
            moves = pool.evacuate(lo)
            if moves is not None:
                for old, new in moves.items():
                    assert model[new] == 0
                    model[new], model[old] = model[old], 0
                held = [moves.get(i, i) for i in held]
                assert pool.shrink_tail(pool.num_blocks - lo)
                for i in range(lo, len(model)):
                    del model[i]
        assert pool.ref_counts() == [model[i] for i in range(pool.num_blocks)]
        assert pool.num_free == sum(c == 0 for c in model.values())
        pool.check_integrity()


def _bulk_trace(seed: int) -> list:
    """What a pool hands out and holds through a random run of large allocations, frees
    with ids repeated in one call (reserved twice), reservations and grows."""
    rng = random.Random(seed)
    pool, held, trace = BlockPool(300), [], []
    for _ in range(400):
        op = rng.random()
        if op < 0.3:
            ids = pool.allocate(rng.choice([1, 3, 70, 150]))
            held += ids or []
            trace.append(ids)
        elif op < 0.6 and held:
            rng.shuffle(held)
            n = rng.randint(1, len(held))
            gone, held = held[:n], held[n:]
            pool.free(gone)
        elif op < 0.9:
            ids = rng.sample(range(pool.num_blocks), rng.randint(0, 90))
            ids += ids[: rng.randint(0, 5)]  # some twice
            pool.reserve(ids)
            held += ids
        else:
            pool.grow(rng.randint(0, 20))
        pool.check_integrity()
        trace.append((pool.ref_counts(), pool.num_free, list(pool._entries())))
    return trace


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_bulk_allocate_and_free_do_what_the_id_by_id_loops_do(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Long id lists go through numpy (a drop frees and allocates 100k ids at once); the
    free list, its order, the counts and every id handed out are those of the loops."""
    monkeypatch.setattr("workers.block_pool.BULK_IDS", 10**9)
    loops = _bulk_trace(seed)
    monkeypatch.setattr("workers.block_pool.BULK_IDS", 1)
    assert _bulk_trace(seed) == loops


def test_a_bulk_free_of_an_id_not_held_changes_nothing() -> None:
    pool = BlockPool(200)
    ids = pool.allocate(100)
    before = (pool.ref_counts(), pool.num_free, list(pool._entries()))
    with pytest.raises(ValueError, match="block 150 freed while not allocated"):
        pool.free(ids[:80] + [150])
    with pytest.raises(ValueError, match="block 5 freed while not allocated"):
        pool.free(ids[:80] + [5])  # held once, freed twice
    assert (pool.ref_counts(), pool.num_free, list(pool._entries())) == before


@pytest.mark.parametrize(
    ("num_tokens", "expected_ids"),
    [(1, [0]), (4, [0]), (5, [0, 1]), (8, [0, 1]), (9, [0, 1, 2]), (16, [0, 1, 2, 3])],
)
def test_allocate_slots_covers_ceil_tokens_over_block_size(
    make_pool, make_request, num_tokens: int, expected_ids: list[int]
) -> None:
    kv = make_pool(blocks=11, block_size=4)
    req = make_request("a", prompt=num_tokens)
    assert kv.allocate_slots(req, num_tokens) == expected_ids
    assert req.block_ids == expected_ids
    assert kv.blocks_needed(num_tokens) == len(expected_ids)


def test_allocate_slots_grows_from_the_computed_tokens(make_pool, make_request) -> None:
    kv = make_pool(blocks=11, block_size=4)
    a, b = make_request("a", prompt=10), make_request("b", prompt=3)
    assert kv.allocate_slots(a, 5) == [0, 1]
    a.num_computed_tokens = 5
    assert kv.allocate_slots(b, 3) == [2]
    assert kv.allocate_slots(a, 3) == []  # 8 tokens still fit in 2 blocks
    assert kv.allocate_slots(a, 5) == [3]  # 10 tokens need 3
    a.num_computed_tokens = 10
    a.output_token_ids.append(7)
    assert kv.allocate_slots(a, 1) == []  # token 11 lands in block 3
    assert (a.block_ids, b.block_ids) == ([0, 1, 3], [2])


def test_allocate_slots_shortage_changes_nothing(make_pool, make_request) -> None:
    kv = make_pool(blocks=3, block_size=4)
    a, b = make_request("a", prompt=8), make_request("b", prompt=8)
    assert kv.allocate_slots(a, 8) == [0, 1]
    assert kv.allocate_slots(b, 8) is None
    assert b.block_ids == []
    assert kv.pool.num_free == 1
    assert kv.allocate_slots(b, 4) == [2]


def test_free_releases_the_tail_block_first(make_pool, make_request) -> None:
    kv = make_pool(blocks=5, block_size=4)
    a, b = make_request("a", prompt=12), make_request("b", prompt=4)
    kv.allocate_slots(a, 12)
    kv.allocate_slots(b, 4)
    kv.free(a)
    assert a.block_ids == []
    assert kv.pool.allocate(4) == [4, 2, 1, 0]
    kv.free(b)
    assert kv.pool.allocate(1) == [3]
    kv.pool.check_integrity()


def test_check_integrity_catches_a_used_block_swapped_for_a_free_one() -> None:
    """Counts alone agree (as many entries as marks); the ids do not."""
    pool = BlockPool(6)
    pool.allocate(6)
    pool.free([2, 3, 4, 5])  # 0 and 1 used
    pool._freed.remove(3)
    pool._freed.append(1)
    with pytest.raises(AssertionError, match="block 1: marked 0, in the free list=True"):
        pool.check_integrity()
