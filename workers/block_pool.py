"""Counting allocator for paged KV-cache blocks: ids, reference counts and a free list.

It never touches tensors, so it is tested on CPU in milliseconds. Out of memory is a ``None``
return, never an exception.
"""

from __future__ import annotations

import itertools
import operator
from collections import deque

from workers.request import Request


class BlockPool:
    """Hands out block ids ``0 .. num_blocks-1`` first-in first-out.

    Invariants (``check_integrity``): every id is either free (ref count 0, in the free list
    once) or used (ref count >= 1, not in the free list).
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._ref_counts = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, 0..1."""
        return self.num_used / self.num_blocks

    def allocate(self, n: int) -> list[int] | None:
        """Takes ``n`` free blocks, or returns None (taking nothing) when fewer are free."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > len(self._free):
            return None
        ids = [self._free.popleft() for _ in range(n)]
        for i in ids:
            self._ref_counts[i] = 1
        return ids

    def free(self, ids: list[int]) -> None:
        """Drops one reference to each id; ids reaching zero go to the back of the free list."""
        for i in ids:
            if self._ref_counts[i] <= 0:
                raise ValueError(f"block {i} freed while not allocated")
            self._ref_counts[i] -= 1
            if self._ref_counts[i] == 0:
                self._free.append(i)

    def ref_counts(self) -> list[int]:
        """Each id's reference count (a copy), indexed by id."""
        return list(self._ref_counts)

    def reserve(self, ids: list[int]) -> None:
        """Takes one reference to each of ``ids``, free or not (a pipeline group reserves the
        ids that alias a pre-drop request's L-layer blocks, workers/remote_attention.py);
        ``free`` gives them back. Raises ValueError for an id outside the pool."""
        bad = [i for i in ids if not 0 <= i < self.num_blocks]
        if bad:
            raise ValueError(f"cannot reserve ids {bad[:4]}: the pool has {self.num_blocks}")
        taken = {i for i in ids if self._ref_counts[i] == 0}
        if taken:  # one C-level pass over the free list (100k+ ids on a large KV cache)
            self._free = deque(itertools.filterfalse(taken.__contains__, self._free))
        for i in ids:
            self._ref_counts[i] += 1

    # Capacity changes, driven by the KV pool when its mapped memory grows or shrinks
    # (workers/kv_pool.py). Ids are positions in the KV tensor, so capacity only changes at
    # the tail: ``grow`` appends ids, ``shrink_tail`` removes free ones, ``evacuate`` moves
    # used ones out of the tail first.

    def grow(self, n: int) -> None:
        """Adds ids ``num_blocks .. num_blocks + n - 1``, free, at the back of the free list."""
        if n < 0:
            raise ValueError(f"cannot grow by {n} blocks")
        self._free.extend(range(self.num_blocks, self.num_blocks + n))
        self._ref_counts.extend([0] * n)
        self.num_blocks += n

    def used_ids(self, lo: int, hi: int) -> list[int]:
        """Ids in ``[lo, hi)`` with a nonzero reference count, ascending."""
        if not 0 <= lo <= hi <= self.num_blocks:
            raise ValueError(f"id range [{lo}, {hi}) is outside [0, {self.num_blocks})")
        return list(itertools.compress(range(lo, hi), self._ref_counts[lo:hi]))  # counts >= 0

    def shrink_tail(self, n: int) -> bool:
        """Removes the last ``n`` ids if all are free; returns False, changing nothing, if any
        is used. Raises ValueError if ``n`` is negative or would leave no block."""
        if not 0 <= n < self.num_blocks:
            raise ValueError(f"cannot shrink {self.num_blocks} blocks by {n}")
        lo = self.num_blocks - n
        if self.used_ids(lo, self.num_blocks):
            return False
        self._free = deque(filter(lo.__gt__, self._free))
        del self._ref_counts[lo:]
        self.num_blocks = lo
        return True

    def evacuate(self, lo: int) -> dict[int, int] | None:
        """Moves every used id ``>= lo`` to a free id ``< lo`` (taken in free-list order),
        keeping its reference count; the old ids become free. Returns ``{old: new}``, or None,
        changing nothing, when fewer free ids lie below ``lo`` than used ids above it. The
        caller copies the blocks' data and rewrites the block tables."""
        used = self.used_ids(lo, self.num_blocks)
        if not used:
            return {}
        below = list(itertools.islice(filter(lo.__gt__, self._free), len(used)))
        if len(below) < len(used):
            return None
        taken = set(below)
        self._free = deque(itertools.filterfalse(taken.__contains__, self._free))
        for old, new in zip(used, below, strict=True):
            self._ref_counts[new], self._ref_counts[old] = self._ref_counts[old], 0
            self._free.append(old)
        return dict(zip(used, below, strict=True))

    def check_integrity(self) -> None:
        """Raises AssertionError, naming a block, if the free list and the ref counts
        disagree. C-level passes (a few ms at 100k blocks: transitions run it) prove that the
        free ids are distinct, all of count 0, and as many as the ids of count 0, so they are
        exactly those; only a failure walks the ids in Python to name one."""
        rc, free = self._ref_counts, self._free
        distinct = len(set(free)) == len(free)
        free_counts = operator.itemgetter(*free)(rc) if free else ()
        free_counts = (free_counts,) if len(free) == 1 else free_counts
        if distinct and min(rc) >= 0 and free_counts.count(0) == len(free) == rc.count(0):
            return
        assert distinct, "a block is in the free list twice"
        members = set(free)
        for i, count in enumerate(rc):
            assert count >= 0, f"block {i} has ref count {count}"
            assert (count == 0) == (i in members), (
                f"block {i}: ref count {count}, free={i in members}"
            )
        raise AssertionError("free list and ref counts disagree")


class KVCacheManager:
    """Gives each request the blocks its tokens need (vLLM v1's ``allocate_slots`` contract)."""

    def __init__(self, pool: BlockPool, block_size: int) -> None:
        self.pool = pool
        self.block_size = block_size

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate_slots(self, request: Request, num_new_tokens: int) -> list[int] | None:
        """Grows ``request.block_ids`` to hold ``num_computed_tokens + num_new_tokens`` tokens.

        Returns the newly added ids, or None (and changes nothing) when the pool is short.
        """
        total = self.blocks_needed(request.num_computed_tokens + num_new_tokens)
        new = self.pool.allocate(max(0, total - len(request.block_ids)))
        if new is not None:
            request.block_ids.extend(new)
        return new

    def free(self, request: Request) -> None:
        """Releases the request's blocks, last block first so the tail is reused last."""
        self.pool.free(list(reversed(request.block_ids)))
        request.block_ids = []
