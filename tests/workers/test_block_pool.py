"""BlockPool and KVCacheManager: exact block ids, shortage, double free and integrity checks."""

from __future__ import annotations

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
    pool._free.append(1)
    with pytest.raises(AssertionError, match="block 1: ref count 1, free=True"):
        pool.check_integrity()


def test_check_integrity_catches_a_free_block_missing_from_the_free_list() -> None:
    pool = BlockPool(6)
    pool._free.remove(4)
    with pytest.raises(AssertionError, match="block 4: ref count 0, free=False"):
        pool.check_integrity()


def test_check_integrity_catches_a_duplicate_in_the_free_list() -> None:
    pool = BlockPool(6)
    pool._free.append(5)
    with pytest.raises(AssertionError, match="in the free list twice"):
        pool.check_integrity()


def test_check_integrity_catches_a_negative_ref_count() -> None:
    pool = BlockPool(6)
    pool._ref_counts[3] = -1
    with pytest.raises(AssertionError, match="block 3 has ref count -1"):
        pool.check_integrity()


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
    """Counts alone agree (as many free ids as ids of count 0); the ids do not."""
    pool = BlockPool(6)
    pool.allocate(2)  # 0 and 1 used; 2..5 free
    pool._free.remove(3)
    pool._free.append(1)
    with pytest.raises(AssertionError, match="block 1: ref count 1, free=True"):
        pool.check_integrity()
