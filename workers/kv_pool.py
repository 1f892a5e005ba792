"""The KV pool: one reserved virtual range whose mapped prefix grows and shrinks by chunks.

A chunk is one physical allocation of whole 2 MiB slots (kernels/vmm.py): the pool's own (one
per growth: start-up, sizing) or a dropped layer's (one per layer). Capacity is counted in
bytes, so it changes by exactly the bytes of the chunks mapped or given back.

Block ``b`` lives at byte ``b * block_bytes`` of the range, so the base address (and the
pointer every kernel and CUDA graph holds) never moves; capacity is the number of whole blocks
in the mapped prefix, and ids past it are simply never handed out (DESIGN §5; the elastic KV of
vTensor/GLakeServe and kvcached, memory-systems.md §2, §7). The pool keeps its ``BlockPool`` in
step with the mapped bytes:

- ``grow(chunks)`` maps chunks at the end (e.g. a dropped layer's) and adds the new block ids;
- ``shrink(n)`` takes the last ``n`` chunks back, only when no live block lies in them
  (optionally leaving them mapped as stale aliases, unmapped later by ``unmap_stale``);
- ``evacuate(n, block_tables)`` first moves live blocks out of those chunks: it copies their
  data to free blocks below, moves their reference counts, and rewrites the block tables.

One thread (the engine loop) calls these between steps; every unmap waits for queued kernels
(the device is synchronized first).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from kernels.vmm import Chunk, ChunkBackend, VirtualRange
from workers.block_pool import BlockPool


@dataclass(frozen=True)
class KVBlockFormat:
    """One KV block: ``[layers_per_block, 2, block_size, num_kv_heads, head_dim]`` of ``dtype``
    (a block holds every layer the stage computes, K then V; DESIGN §5)."""

    layers_per_block: int
    block_size: int
    """Tokens per block."""
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    def __post_init__(self) -> None:
        for name in ("layers_per_block", "block_size", "num_kv_heads", "head_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        return (self.layers_per_block, 2, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def block_bytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class EvacuationNeeded(RuntimeError):
    """A shrink (or a restore) found live blocks in the chunks it must give back."""

    def __init__(self, block_ids: list[int]) -> None:
        self.block_ids = block_ids
        super().__init__(
            f"{len(block_ids)} live KV blocks (first {block_ids[:8]}) lie in the chunks to give "
            "back: evacuate them first"
        )


class KVPool:
    """KV blocks over a VMM range of ``max_slots`` slots whose first ``mapped_slots`` are mapped,
    by the ``num_chunks`` chunks of the live prefix.

    ``kv_cache`` is ``[num_blocks, *fmt.shape]``; ``kv_cache_full`` is the same storage viewed
    at the full reserved capacity ``[max_blocks, *fmt.shape]`` (only ids < ``num_blocks`` may be
    touched), for CUDA graphs captured once. Both start at ``base``, which never moves.
    Raises ValueError when the chunks hold no whole block or exceed ``max_slots``.
    """

    def __init__(
        self,
        backend: ChunkBackend,
        fmt: KVBlockFormat,
        chunks: list[Chunk],
        max_slots: int,
        block_pool: BlockPool | None = None,
    ) -> None:
        slots = sum(c.num_slots for c in chunks)
        if not chunks or slots > max_slots:
            raise ValueError(f"the KV pool needs chunks of 1..{max_slots} slots, got {slots}")
        self.fmt, self.chunk_bytes = fmt, backend.chunk_bytes
        num_blocks = slots * self.chunk_bytes // fmt.block_bytes
        if num_blocks < 1:
            raise ValueError(
                f"{slots} slots of {self.chunk_bytes} bytes hold no KV block of "
                f"{fmt.block_bytes} bytes"
            )
        if block_pool is not None and block_pool.num_blocks != num_blocks:
            raise ValueError(
                f"block pool has {block_pool.num_blocks} blocks, chunks hold {num_blocks}"
            )
        self.range = VirtualRange(backend, max_slots, "kv")
        self.range.map(0, chunks)
        self.mapped_slots = slots
        """Slots of the live prefix; the next chunk maps here."""
        self.block_pool = block_pool or BlockPool(num_blocks)
        self.max_blocks = self.range.nbytes // fmt.block_bytes
        full = (self.max_blocks, *fmt.shape)
        self.kv_cache_full = self.range.view(0, full, fmt.dtype, require_mapped=False)

    @property
    def base(self) -> int:
        """Virtual address of block 0; constant for the pool's life."""
        return self.range.base

    @property
    def num_blocks(self) -> int:
        return self.block_pool.num_blocks

    @property
    def mapped_bytes(self) -> int:
        return self.mapped_slots * self.chunk_bytes

    @property
    def num_chunks(self) -> int:
        """Chunks of the live prefix."""
        return len(self.live_chunks())

    @property
    def kv_cache(self) -> torch.Tensor:
        """``[num_blocks, layers_per_block, 2, block_size, num_kv_heads, head_dim]``."""
        return self.kv_cache_full[: self.num_blocks]

    def prefix_bytes(self) -> torch.Tensor:
        """``[mapped_bytes]`` uint8 view of the live prefix, e.g. to view the same bytes as
        blocks of another ``layers_per_block`` after a drop (DESIGN §5)."""
        return self.range.view(0, (self.mapped_bytes,), torch.uint8)

    def detach_block_pool(self) -> BlockPool:
        """Gives the pool a fresh ``BlockPool`` of ``num_blocks`` ids, all free, and returns the
        old one, whose allocations then hold nothing here (a later ``grow`` or ``shrink`` does
        not see them). For a pipeline group: its scheduler counts blocks of another layer count
        in a pool of its own while these bytes grow and shrink (workers/stage_memory.py)."""
        old, self.block_pool = self.block_pool, BlockPool(self.num_blocks)
        return old

    def blocks_in(self, num_slots: int) -> int:
        """Whole blocks in the first ``num_slots`` slots of the range."""
        return num_slots * self.chunk_bytes // self.fmt.block_bytes

    def grow(self, chunks: list[Chunk]) -> int:
        """Maps ``chunks`` back to back after the live prefix (one ``cuMemMap`` each, one access
        call over them all); returns the number of block ids added, which is exactly the
        whole blocks their bytes complete.

        Chunks still mapped at their place past the prefix (left by ``shrink(unmap=False)`` or
        ``premap``) are adopted back with no driver call. Raises ValueError when the reserved
        range has too few slots left.
        """
        slots = sum(c.num_slots for c in chunks)
        if self.mapped_slots + slots > self.range.num_slots:
            raise ValueError(
                f"KV range of {self.range.num_slots} slots cannot grow from {self.mapped_slots} "
                f"by {slots}"
            )
        self.range.remap(self.mapped_slots, chunks)
        before = self.num_blocks
        self.mapped_slots += slots
        self.block_pool.grow(self.blocks_in(self.mapped_slots) - before)
        return self.num_blocks - before

    def premap(self, chunks: list[Chunk]) -> int:
        """Maps ``chunks`` where ``grow`` would put them, without adding blocks (stale aliases
        past the prefix), so a later ``grow`` by the same chunks makes no driver call; for an
        idle worker ahead of a drop. Returns how many were newly mapped. Raises ValueError
        when the reserved range has too few slots left."""
        slots = sum(c.num_slots for c in chunks)
        if self.mapped_slots + slots > self.range.num_slots:
            raise ValueError(f"KV range has {self.range.num_slots - self.mapped_slots} free slots")
        return self.range.remap(self.mapped_slots, chunks)

    def tail_count(self, nbytes: int) -> int:
        """How many chunks at the end of the live prefix hold exactly ``nbytes`` bytes (what
        giving those bytes back takes). Raises ValueError when no chunk boundary lies
        ``nbytes`` before the end of the prefix (chunks are given back whole)."""
        n, slot, want = 0, self.mapped_slots, nbytes // self.chunk_bytes
        lives = self.live_chunks()
        while slot > self.mapped_slots - want and n < len(lives):
            n += 1
            slot -= lives[-n].num_slots
        if nbytes % self.chunk_bytes or slot != self.mapped_slots - want:
            raise ValueError(
                f"the KV pool's chunks do not end {nbytes} bytes before its end "
                f"(last chunks: {[c.nbytes for c in lives[-4:]]} bytes)"
            )
        return n

    def live_tail_blocks(self, n: int) -> list[int]:
        """Live block ids that lie, even partly, in the last ``n`` mapped chunks."""
        return self.block_pool.used_ids(self._tail_start(n), self.num_blocks)

    def evacuate(self, n: int, block_tables: Iterable[list[int]]) -> dict[int, int] | None:
        """Moves the live blocks out of the last ``n`` chunks to free blocks below them.

        Copies each moved block's data (on the device's current stream), moves its reference
        count, and rewrites every list in ``block_tables`` in place (e.g. each running
        request's ``block_ids``). Returns ``{old_id: new_id}``, or None, changing nothing,
        when too few blocks below are free.
        """
        moves = self.block_pool.evacuate(self._tail_start(n))
        if moves is None:
            return None
        if moves:
            dev = self.kv_cache_full.device
            src = torch.tensor(list(moves), dtype=torch.int64, device=dev)
            dst = torch.tensor(list(moves.values()), dtype=torch.int64, device=dev)
            kv = self.kv_cache
            kv.index_copy_(0, dst, kv.index_select(0, src))
        for table in block_tables:
            table[:] = [moves.get(b, b) for b in table]
        return moves

    def shrink(self, n: int, *, unmap: bool = True) -> list[Chunk]:
        """Takes the last ``n`` live chunks out of the pool and returns them in slot order.

        Raises EvacuationNeeded, changing nothing, while live blocks lie in them. With
        ``unmap=False`` they stay mapped here as stale aliases (nothing may touch block ids
        past ``num_blocks``) until ``unmap_stale``, so the caller can map them elsewhere
        without waiting for a device sync and ``cuMemUnmap``.
        """
        lo = self._tail_start(n)
        live = self.block_pool.used_ids(lo, self.num_blocks)
        if live:
            raise EvacuationNeeded(live)
        if not self.block_pool.shrink_tail(self.num_blocks - lo):
            raise AssertionError("block pool refused a tail with no live block")
        chunks = self.live_chunks()[-n:] if n else []
        self.mapped_slots -= sum(c.num_slots for c in chunks)
        if unmap:
            self.range.unmap(self.mapped_slots, sum(c.num_slots for c in chunks))
        return chunks

    def live_chunks(self) -> list[Chunk]:
        """Chunks of the live prefix, in slot order."""
        return [c for _, c in self.range.mappings(0, self.mapped_slots)]

    def stale_chunks(self) -> list[Chunk]:
        """Chunks still mapped past the live prefix (lent elsewhere, not yet unmapped here)."""
        return [c for _, c in self.range.mappings(self.mapped_slots)]

    def unmap_stale(self) -> int:
        """Unmaps every chunk past the live prefix (after one device sync, one backend call per
        run of adjacent chunks); returns how many."""
        return len(self.range.unmap_within(self.mapped_slots, self.range.num_slots))

    def close(self) -> list[Chunk]:
        """Unmaps everything and frees the range; returns the live chunks (stale aliases belong
        to their other range). Views into the pool die with it."""
        self.unmap_stale()
        self.mapped_slots = 0
        return self.range.close()

    def check_integrity(self) -> None:
        """Raises AssertionError if blocks, mapped slots and the block pool disagree."""
        self.block_pool.check_integrity()
        assert self.num_blocks == self.blocks_in(self.mapped_slots), (
            f"{self.num_blocks} blocks over {self.mapped_slots} slots"
        )
        assert self.range.is_mapped(0, self.mapped_slots), "the live prefix has unmapped slots"
        assert sum(c.num_slots for c in self.live_chunks()) == self.mapped_slots

    def _tail_start(self, n: int) -> int:
        """First block id that lies, even partly, in the last ``n`` chunks."""
        lives = self.live_chunks()
        if not 0 <= n < len(lives):
            raise ValueError(f"cannot give back {n} of {len(lives)} KV chunks (keep >= 1)")
        lo = self.blocks_in(self.mapped_slots - sum(c.num_slots for c in lives[len(lives) - n :]))
        if lo < 1:
            raise ValueError(f"giving back {n} KV chunks would leave no whole block")
        return lo
