"""Counting allocator for paged KV-cache blocks: ids, reference counts and a free list.

It never touches tensors, so it is tested on CPU in milliseconds. Out of memory is a ``None``
return, never an exception.
"""

from __future__ import annotations

import itertools
from array import array
from collections import deque
from collections.abc import Iterator

import numpy as np

from workers.request import Request


def _warm_up_numpy() -> None:
    """numpy sets up each form of ``unique`` at its first call (~10 ms): done at import, not
    in a parked drop (the forms of ``check_integrity``, ``_counted`` and ``_last_index``)."""
    for kwargs in ({}, {"return_counts": True}, {"return_index": True}):
        np.unique(np.zeros(2, dtype=np.int64), **kwargs)


_warm_up_numpy()


def _many(ids: np.ndarray, num_blocks: int) -> bool:
    """Whether ``ids`` are many enough (an eighth of the pool) that a pool-sized array
    beats a sort or a hash of them."""
    return 8 * len(ids) >= num_blocks


def _counted(ids: np.ndarray, num_blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """The distinct ``ids`` (ascending) and how often each occurs: by counting over the
    pool when the ids are many (no sort), else by ``np.unique``."""
    if not _many(ids, num_blocks):
        return np.unique(ids, return_counts=True)
    counts = np.bincount(ids, minlength=num_blocks)
    u = np.flatnonzero(counts)
    return u, counts[u]


def _member(ids: np.ndarray, of: np.ndarray, num_blocks: int) -> np.ndarray:
    """Whether each of ``ids`` is in ``of`` (both distinct): through a pool-sized mask when
    the ids are many, else by ``np.isin``."""
    if not _many(ids, num_blocks):
        return np.isin(ids, of, assume_unique=True)
    mask = np.zeros(num_blocks, dtype=bool)
    mask[of] = True
    return mask[ids]


def _last_index(ids: np.ndarray, distinct: np.ndarray, num_blocks: int) -> np.ndarray:
    """For each of ``distinct`` (``ids``' distinct values, ascending), the position of its
    last occurrence in ``ids``: through a pool-sized array when the ids are many (2.4 ms
    for 200k ids twice each, where ``np.unique``'s index form took 26 ms), else by
    ``np.unique``."""
    if not _many(ids, num_blocks):
        return len(ids) - 1 - np.unique(ids[::-1], return_index=True)[1]
    last = np.full(num_blocks, -1, dtype=np.int64)
    np.maximum.at(last, ids, np.arange(len(ids)))
    return last[distinct]


BULK_IDS = 64
"""From this many ids on, ``allocate`` and ``free`` work at C speed (numpy) instead of one id
at a time (cheaper for the one or two ids of a decode step)."""


class BlockPool:
    """Hands out block ids ``0 .. num_blocks-1`` first-in first-out.

    The free list is the ids never handed out (a range: building a pool runs no Python loop
    over its ids, only two C-level fills), then the ids given back, in the order they came
    back. :meth:`reserve` takes free ids
    without searching the free list: their entries stay in it, stale, and a pop skips an entry
    whose id is in use. So an id reserved and given back before its entry is reached keeps its
    place instead of going to the back; that is the only departure from first-in first-out.
    Each id has at most one entry.

    Invariants (``check_integrity``): reference counts are >= 0; every id of count 0 is in the
    free list; no id is in it twice; ``num_free`` counts the ids of count 0.
    """

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self._next = 0
        """Ids ``[_next, _fresh_end)`` are the front of the free list (never handed out)."""
        self._fresh_end = num_blocks
        self._freed: deque[int] = deque()
        """The rest of the free list: ids given back (or grown) since, oldest first."""
        self._queued = bytearray(b"\x01") * num_blocks
        """1 where the id has an entry in the free list (live or stale)."""
        self._ref_counts = array("q", bytes(8 * num_blocks))
        self._num_free = num_blocks

    @property
    def num_free(self) -> int:
        return self._num_free

    @property
    def num_used(self) -> int:
        return self.num_blocks - self._num_free

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, 0..1."""
        return self.num_used / self.num_blocks

    def _entries(self) -> Iterator[int]:
        """The free list in order, stale entries included."""
        return itertools.chain(range(self._next, self._fresh_end), self._freed)

    def _pop(self) -> int:
        """The next live entry's id (the caller checked that one is left)."""
        rc, queued = self._ref_counts, self._queued
        while True:
            if self._next < self._fresh_end:
                i = self._next
                self._next += 1
            else:
                i = self._freed.popleft()
            queued[i] = 0
            if rc[i] == 0:
                return i

    def allocate(self, n: int) -> list[int] | None:
        """Takes ``n`` free blocks, or returns None (taking nothing) when fewer are free."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > self._num_free:
            return None
        if n < BULK_IDS:
            ids = [self._pop() for _ in range(n)]
            rc = self._ref_counts
            for i in ids:
                rc[i] = 1
        else:
            ids = self._take_fresh(n)
            ids += [self._pop() for _ in range(n - len(ids))]
            np.frombuffer(self._ref_counts, dtype=np.int64)[ids] = 1
        self._num_free -= n
        return ids

    def _take_fresh(self, n: int) -> list[int]:
        """Up to ``n`` free ids from the front of the fresh range, as ``_pop`` would take
        them, found at C speed: a group pool's fresh range starts with the reservations of
        pre-drop requests (their entries stale), and a drop allocates for all of them at once
        (100k ids: ~70 ms in ``_pop``'s loop, workers/remote_attention.py)."""
        rc, found, at = np.frombuffer(self._ref_counts, dtype=np.int64), [], self._next
        while at < self._fresh_end and len(found) < n:  # windows of a few times what is left
            hi = min(self._fresh_end, at + 4 * (n - len(found)) + 1024)
            free = np.flatnonzero(rc[at:hi] == 0)[: n - len(found)]
            found += (free + at).tolist()
            at = found[-1] + 1 if len(found) == n else hi
        self._queued[self._next : at] = bytes(at - self._next)  # their entries are popped
        self._next = at
        return found

    def free(self, ids: list[int]) -> None:
        """Drops one reference to each id; ids reaching zero go to the back of the free list
        (or stay where their stale entry is: see the class docstring), in the order they
        reach zero. Raises ValueError for an id freed more often than it is held (a long list
        changes nothing then; a short one has freed the ids before it)."""
        if len(ids) >= BULK_IDS:
            self._free_bulk(ids)
            return
        rc, queued = self._ref_counts, self._queued
        for i in ids:
            if rc[i] <= 0:
                raise ValueError(f"block {i} freed while not allocated")
            rc[i] -= 1
            if rc[i] == 0:
                self._num_free += 1
                if not queued[i]:
                    queued[i] = 1
                    self._freed.append(i)

    def _free_bulk(self, ids: list[int]) -> None:
        """:meth:`free` at C speed (a pipeline group gives back a pre-drop request's
        reservations, hundreds of ids, in one call)."""
        a = np.asarray(ids, dtype=np.int64)
        if a.min() < 0 or a.max() >= self.num_blocks:
            bad = a[(a < 0) | (a >= self.num_blocks)][0]
            raise ValueError(f"block {bad} freed while not allocated")
        u, counts = _counted(a, self.num_blocks)
        rc = np.frombuffer(self._ref_counts, dtype=np.int64)
        over = rc[u] < counts
        if over.any():
            raise ValueError(f"block {u[over][0]} freed while not allocated")
        rc[u] -= counts
        zero = rc[u] == 0
        self._num_free += int(np.count_nonzero(zero))
        queued = np.frombuffer(self._queued, dtype=np.uint8)
        joins = zero & (queued[u] == 0)  # they go to the back of the free list
        if len(u) == len(a):  # distinct: in the order given
            order = a[_member(a, u[joins], self.num_blocks)]
        else:  # each reaches zero at its last occurrence in ``ids``
            last = _last_index(a, u, self.num_blocks)
            order = u[joins][np.argsort(last[joins], kind="stable")]
        queued[order] = 1
        self._freed.extend(order.tolist())

    def ref_counts(self) -> list[int]:
        """Each id's reference count (a copy), indexed by id."""
        return self._ref_counts.tolist()

    def ref_count_array(self) -> np.ndarray:
        """Each id's reference count as int64 [num_blocks] (a copy, made at C speed)."""
        return np.frombuffer(self._ref_counts, dtype=np.int64).copy()

    def reserve(self, ids: list[int] | np.ndarray) -> None:
        """Takes one reference to each of ``ids``, free or not (a pipeline group reserves the
        ids that alias a pre-drop request's L-layer blocks, workers/remote_attention.py);
        ``free`` gives them back. At C speed, and without touching the free list: a free
        id's entry stays in it, stale. Raises ValueError, taking nothing, for an id outside
        the pool."""
        if len(ids) == 0:
            return
        a = np.asarray(ids, dtype=np.int64)
        bad = a[(a < 0) | (a >= self.num_blocks)]
        if bad.size:
            raise ValueError(
                f"cannot reserve ids {bad[:4].tolist()}: the pool has {self.num_blocks}"
            )
        u, counts = _counted(a, self.num_blocks)
        rc = np.frombuffer(self._ref_counts, dtype=np.int64)
        self._num_free -= int(np.count_nonzero(rc[u] == 0))
        rc[u] += counts

    # Capacity changes, driven by the KV pool when its mapped memory grows or shrinks
    # (workers/kv_pool.py). Ids are positions in the KV tensor, so capacity only changes at
    # the tail: ``grow`` appends ids, ``shrink_tail`` removes free ones, ``evacuate`` moves
    # used ones out of the tail first.

    def grow(self, n: int) -> None:
        """Adds ids ``num_blocks .. num_blocks + n - 1``, free, at the back of the free list."""
        if n < 0:
            raise ValueError(f"cannot grow by {n} blocks")
        new = range(self.num_blocks, self.num_blocks + n)
        if not self._freed and self._fresh_end == self.num_blocks:
            self._fresh_end += n  # the fresh range is the back of the free list
        else:
            self._freed.extend(new)
        self._queued += b"\x01" * n
        self._ref_counts.frombytes(bytes(8 * n))
        self._num_free += n
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
        self._fresh_end = min(self._fresh_end, lo)
        self._next = min(self._next, self._fresh_end)
        self._freed = deque(filter(lo.__gt__, self._freed))
        del self._ref_counts[lo:]
        del self._queued[lo:]
        self._num_free -= n
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
        rc = self._ref_counts
        below = list(
            itertools.islice((i for i in self._entries() if i < lo and rc[i] == 0), len(used))
        )
        if len(below) < len(used):
            return None
        for old, new in zip(used, below, strict=True):  # the new ids' entries go stale
            rc[new], rc[old] = rc[old], 0
            if not self._queued[old]:
                self._queued[old] = 1
                self._freed.append(old)
        return dict(zip(used, below, strict=True))

    def check_integrity(self) -> None:
        """Raises AssertionError, naming a block, if the free list, its marks and the ref
        counts disagree. Vectorized passes (about a millisecond at 100k blocks) prove that the
        entries are distinct and exactly the marked ids, that no count is negative, that every
        id of count 0 is marked, and that ``num_free`` counts them; only a failure walks the
        ids in Python to name one."""
        entries = np.fromiter(self._entries(), dtype=np.int64)
        rc = np.frombuffer(self._ref_counts, dtype=np.int64)
        marked = np.frombuffer(self._queued, dtype=np.uint8).astype(bool)
        zero = int(np.count_nonzero(rc == 0))
        distinct = np.unique(entries).size == entries.size
        if (
            distinct
            and (rc >= 0).all()
            and marked[entries].all()
            and int(marked.sum()) == entries.size
            and marked[rc == 0].all()
            and zero == self._num_free
        ):
            return
        del rc  # no buffer export outlives the check
        assert distinct, "a block is in the free list twice"
        members = set(entries.tolist())
        for i, count in enumerate(self._ref_counts):
            assert count >= 0, f"block {i} has ref count {count}"
            assert count > 0 or i in members, f"block {i}: ref count 0, not in the free list"
            assert bool(self._queued[i]) == (i in members), (
                f"block {i}: marked {self._queued[i]}, in the free list={i in members}"
            )
        raise AssertionError(f"num_free is {self._num_free}, but {zero} ids have ref count 0")


class KVCacheManager:
    """Gives each request the blocks its tokens need (vLLM v1's ``allocate_slots`` contract)."""

    def __init__(self, pool: BlockPool, block_size: int) -> None:
        self.pool = pool
        self.block_size = block_size

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate_slots(self, request: Request, num_new_tokens: int) -> list[int] | None:
        """Grows ``request.block_ids`` to hold ``num_started_tokens + num_new_tokens`` tokens
        (the next chunk's end).

        Returns the newly added ids, or None (and changes nothing) when the pool is short.
        """
        total = self.blocks_needed(request.num_started_tokens + num_new_tokens)
        new = self.pool.allocate(max(0, total - len(request.block_ids)))
        if new is not None:
            request.block_ids.extend(new)
        return new

    def free(self, request: Request) -> None:
        """Releases the request's blocks, last block first so the tail is reused last."""
        self.pool.free(list(reversed(request.block_ids)))
        request.block_ids = []
