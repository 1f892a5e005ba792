"""Counting allocator for paged KV-cache blocks: ids, reference counts and a free list.

It never touches tensors, so it is tested on CPU in milliseconds. Out of memory is a ``None``
return, never an exception.
"""

from __future__ import annotations

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

    def check_integrity(self) -> None:
        """Raises AssertionError if the free list and the ref counts disagree."""
        free = set(self._free)
        assert len(free) == len(self._free), "a block is in the free list twice"
        for i, rc in enumerate(self._ref_counts):
            assert rc >= 0, f"block {i} has ref count {rc}"
            assert (rc == 0) == (i in free), f"block {i}: ref count {rc}, free={i in free}"


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
