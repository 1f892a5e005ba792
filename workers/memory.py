"""One worker's device memory: a chunk pool shared by the weight arena and the KV pool.

::

    ChunkPool (all chunks, created once) ──lease──▶ WeightArena  (embed | layers | head)
                                          └─lease──▶ KVPool       (blocks over a growing prefix)
    drop_layers:    arena layers' chunks ──map──▶ KV tail   (no copy, no allocation)
    restore_layers: KV tail chunks ──map──▶ arena layers, refilled from a host copy or a peer
    flush:          unmap the old aliases that lazy drops and restores left behind (when idle)

DESIGN §5-6 (drop and restore), memory-systems.md §1.6 (Oneiros' remap sequence) and §6.5
(synchronize before unmap; batch access). Every call comes from the engine loop's thread,
between steps.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from kernels.vmm import ChunkBackend, ChunkPool, make_backend
from workers.kv_pool import EvacuationNeeded, KVBlockFormat, KVPool
from workers.weight_arena import (
    ArenaLayout,
    WeightArena,
    WeightSource,
    layout_for_model,
    place_model_in_arena,
    restore_order,
)


@dataclass(frozen=True)
class DropStats:
    """What a drop did. ``usable_s``: seconds until the KV blocks existed (chunks mapped into
    the KV pool); ``total_s``: until the weight side was unmapped too."""

    num_chunks: int
    nbytes: int
    blocks_added: int
    usable_s: float
    total_s: float


@dataclass(frozen=True)
class RestoreStats:
    """What a restore did. ``enqueue_s``: host seconds to remap and enqueue every refill copy
    (the copies may still run; work queued after them on the stream is ordered after)."""

    num_chunks: int
    nbytes: int
    blocks_removed: int
    enqueue_s: float


class WorkerMemory:
    """The chunk pool, the weight arena of ``layout`` and a KV pool of ``kv_chunks`` chunks.

    The pool holds ``layout.num_slots + kv_chunks`` chunks, created up front (more with
    ``add_kv_chunks``). The KV range reserves ``max_kv_chunks`` slots (at least every chunk of
    the pool, so it can absorb all droppable layers; virtual addresses are cheap, so a worker
    passes the device's memory size in chunks). Raises VmmError when the device cannot commit
    the chunks, ValueError on bad sizes.
    """

    def __init__(
        self,
        backend: ChunkBackend,
        layout: ArenaLayout,
        fmt: KVBlockFormat,
        kv_chunks: int,
        max_kv_chunks: int | None = None,
    ) -> None:
        self.backend = backend
        self.pool = ChunkPool(backend, layout.num_slots + kv_chunks)
        self.arena = WeightArena(self.pool, layout)
        kv = self.pool.take(kv_chunks)
        assert kv is not None, "the pool was sized for the arena and the KV pool"
        max_kv = max(max_kv_chunks or 0, self.pool.num_chunks)
        self.kv = KVPool(backend, fmt, kv, max_kv)
        self.owns_backend = False

    def add_kv_chunks(self, n: int) -> int:
        """Commits ``n`` more chunks (``cuMemCreate``) and grows the KV pool by them; returns
        the block ids added. For sizing the KV cache after a profiling run."""
        self.pool.create(n)
        return self.kv.grow(self.pool.take(n) or [])

    @classmethod
    def for_model(
        cls,
        model: nn.Module,
        dtype: torch.dtype,
        fmt: KVBlockFormat,
        kv_chunks: int,
        backend: ChunkBackend | None = None,
        device: torch.device | str = "cpu",
        max_kv_chunks: int | None = None,
    ) -> WorkerMemory:
        """Lays out ``model``'s parameters (``dtype``), builds the memory, and places the
        model in the arena (binding meta parameters, copying real ones). Without ``backend``
        one is made for ``device`` and closed by ``close``."""
        owns, backend = backend is None, backend or make_backend(device)
        layout = layout_for_model(model, dtype, backend.chunk_bytes)
        memory = cls(backend, layout, fmt, kv_chunks, max_kv_chunks)
        memory.owns_backend = owns
        place_model_in_arena(model, memory.arena)
        return memory

    def drop_layers(self, start: int, end: int, *, lazy: bool = True) -> DropStats:
        """Gives the chunks of layers ``[start, end)`` to the KV pool, which grows by exactly
        their bytes (no copy, no allocation).

        Lazily the chunks are mapped into the KV range while the weight range keeps them as
        stale aliases (CUDA's virtual aliasing) until ``flush``; a later restore adopts them
        back for free. Eagerly (``lazy=False``) the weight range is unmapped first (device
        sync, then ``cuMemUnmap``, ~17.5 µs a chunk on H200); without lazy calls no chunk is
        ever mapped in two places.
        Raises ValueError, changing nothing, for bad layers or a KV range without room.
        """
        t0 = time.perf_counter()
        self.arena.check_layers(start, end, dropped=False)
        n = self.arena.num_layer_chunks(start, end)
        room = self.kv.range.num_slots - self.kv.num_chunks
        if n > room:
            raise ValueError(f"the KV range has room for {room} more chunks, layers need {n}")
        if lazy:
            chunks = self.arena.layer_chunks(start, end)
            added = self.kv.grow(chunks)
            usable = time.perf_counter()
            self.arena.drop_layers(start, end, unmap=False)
        else:
            chunks = self.arena.drop_layers(start, end)
            added = self.kv.grow(chunks)
            usable = time.perf_counter()
        nbytes = len(chunks) * self.backend.chunk_bytes
        return DropStats(len(chunks), nbytes, added, usable - t0, time.perf_counter() - t0)

    def evacuate_for_restore(
        self, start: int, end: int, block_tables: Iterable[list[int]]
    ) -> dict[int, int] | None:
        """Moves live KV blocks out of the chunks that restoring ``[start, end)`` takes back;
        see ``KVPool.evacuate`` (None: too few free blocks below, nothing changed)."""
        self.arena.check_layers(start, end, dropped=True)
        return self.kv.evacuate(self.arena.num_layer_chunks(start, end), block_tables)

    def restore_layers(
        self, start: int, end: int, source: WeightSource | None, *, lazy: bool = True
    ) -> RestoreStats:
        """Takes the KV tail back for layers ``[start, end)`` and refills them from ``source``.

        Raises EvacuationNeeded, changing nothing, while live blocks lie in that tail. Layer by
        layer in ``restore_order`` the tail chunks are mapped under the layer (kept as they
        are where a lazy drop left them mapped) and its refill is enqueued, so later layers'
        remaps overlap earlier layers' copies. Eagerly the whole tail is unmapped from the KV
        range first (one device sync); lazily it stays mapped there as stale aliases, past
        ``num_blocks``, until ``flush``.
        """
        t0 = time.perf_counter()
        self.arena.check_layers(start, end, dropped=True)
        n = self.arena.num_layer_chunks(start, end)
        live = self.kv.live_tail_blocks(n)
        if live:
            raise EvacuationNeeded(live)
        before = self.kv.num_blocks
        tail = [] if lazy else self.kv.shrink(n)
        for layer in restore_order(start, end):
            k = self.arena.num_layer_chunks(layer, layer + 1)
            if lazy:
                chunks = self.kv.shrink(k, unmap=False)
            else:
                chunks, tail = tail[-k:], tail[:-k]
            self.arena.restore_layers(layer, layer + 1, chunks, source)
        nbytes = n * self.backend.chunk_bytes
        return RestoreStats(n, nbytes, before - self.kv.num_blocks, time.perf_counter() - t0)

    def flush(self) -> int:
        """Unmaps the stale aliases that lazy drops and restores left (a device sync and
        ``cuMemUnmap`` each); returns how many chunk mappings went. Call when idle."""
        return self.arena.unmap_stale() + self.kv.unmap_stale()

    def check_integrity(self) -> None:
        """Raises AssertionError unless every chunk is exactly one of: free, held by the
        arena, live in the KV pool; and every stale alias maps a chunk held or live."""
        self.kv.check_integrity()
        self.pool.check_integrity()
        held, live = self.arena.held_chunks(), self.kv.live_chunks()
        owned = [c.index for c in held + live + self.pool.free_chunks()]
        assert len(owned) == len(set(owned)) == self.pool.num_chunks, (
            f"arena {len(held)} + KV {len(live)} + free {self.pool.num_free} chunks are not "
            f"the pool's {self.pool.num_chunks} exactly once"
        )
        in_use = {c.index for c in held + live}
        stale = self.arena.stale_chunks() + self.kv.stale_chunks()
        assert {c.index for c in stale} <= in_use, "a stale alias maps a chunk nobody holds"

    def close(self) -> None:
        """Unmaps both ranges and releases every chunk. Views into them die with it."""
        self.flush()
        self.pool.give(self.kv.close())
        self.arena.close()
        self.pool.close()
        if self.owns_backend:
            self.backend.close()
