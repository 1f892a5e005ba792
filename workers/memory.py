"""One worker's device memory: a chunk pool shared by the weight arena and the KV pool.

::

    ChunkPool (chunks created up front) ──lease──▶ WeightArena  (embed | layers | head)
                                          └─lease──▶ KVPool       (blocks over a growing prefix)
    drop_layers:    arena layers' chunks ──map──▶ KV tail   (no copy, no allocation)
    restore_layers: KV tail chunks ──map──▶ arena layers, refilled from a host copy or a peer
    flush:          unmap the old aliases that lazy drops and restores left behind (when idle)

Chunk sizes follow the driver's costs (memory-systems.md §6.3, and the H200 bench: ~23 µs per
2 MiB mapping with its access, i.e. 76 ms to map Llama-3-8B's layers 16..31 slot by slot):
each arena region is one chunk of its own slots and the KV pool grows by one chunk per call, so
a drop of ``k`` layers is ``k`` ``cuMemMap`` and one ``cuMemSetAccess`` (``DropStats.driver_calls``).

DESIGN §5-6 (drop and restore), memory-systems.md §1.6 (Oneiros' remap sequence) and §6.5
(synchronize before unmap; batch access). Every call comes from the engine loop's thread,
between steps.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from kernels.vmm import Chunk, ChunkBackend, ChunkPool, VmmError, make_backend
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
    driver_calls: int = 0
    """VMM driver calls the drop made (``ChunkBackend.calls``, every name counted)."""


@dataclass(frozen=True)
class RestoreStats:
    """What a restore did. ``enqueue_s``: host seconds to remap and enqueue every refill copy
    (the copies may still run; work queued after them on the stream is ordered after)."""

    num_chunks: int
    nbytes: int
    blocks_removed: int
    enqueue_s: float


class WorkerMemory:
    """The chunk pool, the weight arena of ``layout`` and a KV pool of ``kv_slots`` slots.

    Created up front: one chunk per arena region (its slots) and one of ``kv_slots`` for the
    KV pool (more with ``add_kv_slots``). The KV range reserves ``max_kv_slots`` slots (at
    least every slot of the pool, so it can absorb all droppable layers; virtual addresses are
    cheap, so a worker passes the device's memory size in slots). Raises VmmError when the
    device cannot commit the chunks (releasing what it created), ValueError on bad sizes.
    """

    def __init__(
        self,
        backend: ChunkBackend,
        layout: ArenaLayout,
        fmt: KVBlockFormat,
        kv_slots: int,
        max_kv_slots: int | None = None,
    ) -> None:
        self.backend = backend
        self.pool = ChunkPool(backend)
        try:
            for num_slots, n in sorted(Counter(r.num_slots for r in layout.regions).items()):
                self.pool.create(n, num_slots)
            self.pool.create(1, kv_slots)
        except VmmError:
            self.pool.close()
            raise
        self.arena = WeightArena(self.pool, layout)
        kv = self.pool.take(1, kv_slots)
        assert kv is not None, "the pool was sized for the arena and the KV pool"
        max_kv = max(max_kv_slots or 0, self.pool.num_slots)
        self.kv = KVPool(backend, fmt, kv, max_kv)
        self.owns_backend = False

    def add_kv_slots(self, n: int) -> int:
        """Commits one more chunk of ``n`` slots (one ``cuMemCreate``) and grows the KV pool by
        it; returns the block ids added. For sizing the KV cache after a profiling run."""
        self.pool.create(1, n)
        return self.kv.grow(self.pool.take(1, n) or [])

    def ensure_kv_blocks(self, num_blocks: int) -> int:
        """Grows the KV pool (one new chunk, zero-filled as ``torch.zeros`` would be) until it
        holds at least ``num_blocks`` blocks, rounding up to whole slots; returns the block
        ids added (0 when it held enough)."""
        cb = self.backend.chunk_bytes
        missing = -(-num_blocks * self.kv.fmt.block_bytes // cb) - self.kv.mapped_slots
        if missing <= 0:
            return 0
        before = self.kv.num_blocks
        added = self.add_kv_slots(missing)
        self.kv.kv_cache[before:].zero_()
        return added

    @classmethod
    def for_model(
        cls,
        model: nn.Module,
        dtype: torch.dtype,
        fmt: KVBlockFormat,
        kv_slots: int,
        backend: ChunkBackend | None = None,
        device: torch.device | str = "cpu",
        max_kv_slots: int | None = None,
    ) -> WorkerMemory:
        """Lays out ``model``'s parameters (``dtype``), builds the memory, and places the
        model in the arena (binding meta parameters, copying real ones). Without ``backend``
        one is made for ``device`` and closed by ``close``."""
        owns, backend = backend is None, backend or make_backend(device)
        layout = layout_for_model(model, dtype, backend.chunk_bytes)
        memory = cls(backend, layout, fmt, kv_slots, max_kv_slots)
        memory.owns_backend = owns
        try:
            place_model_in_arena(model, memory.arena)
        except Exception:
            memory.close()
            raise
        return memory

    def drop_layers(self, start: int, end: int, *, lazy: bool = True) -> DropStats:
        """Gives the chunks of layers ``[start, end)`` to the KV pool, which grows by exactly
        their bytes (no copy, no allocation).

        Lazily the chunks (one per layer) are mapped into the KV range, ``k`` ``cuMemMap`` and
        one ``cuMemSetAccess`` for ``k`` layers, while the weight range keeps them as stale
        aliases (CUDA's virtual aliasing) until ``flush``; a later restore adopts them back for
        free, and a ``premap_drop`` beforehand makes the drop itself call nothing. Eagerly
        (``lazy=False``) the weight range is unmapped first (device sync, then one batched
        ``cuMemUnmap``); without lazy calls no chunk is ever mapped in two places.
        Raises ValueError, changing nothing, for bad layers or a KV range without room.
        """
        t0, calls = time.perf_counter(), self._num_calls()
        self.arena.check_layers(start, end, dropped=False)
        n = self.arena.num_layer_slots(start, end)
        room = self.kv.range.num_slots - self.kv.mapped_slots
        if n > room:
            raise ValueError(f"the KV range has room for {room} more slots, layers need {n}")
        if lazy:
            chunks = self.arena.layer_chunks(start, end)
            added = self.kv.grow(chunks)
            usable = time.perf_counter()
            self.arena.drop_layers(start, end, unmap=False)
        else:
            chunks = self.arena.drop_layers(start, end)
            added = self.kv.grow(chunks)
            usable = time.perf_counter()
        nbytes = sum(c.nbytes for c in chunks)
        total, calls = time.perf_counter() - t0, self._num_calls() - calls
        return DropStats(len(chunks), nbytes, added, usable - t0, total, calls)

    def premap_drop(self, start: int, end: int) -> int:
        """Maps held layers ``[start, end)``'s chunks into the KV range where dropping them
        would put them, as stale aliases past the live blocks, so the drop itself then makes
        no driver call (``KVPool.premap``); returns how many were newly mapped.

        For a worker that expects this drop (the mapping costs what a drop's would), also
        while its engine serves: nothing reads past the live blocks. Until the drop, block ids
        past ``num_blocks`` alias those weights (they are never handed out); ``flush`` and any
        other KV growth undo it. Raises ValueError for layers not all held or a KV range
        without room."""
        return self.premap_drops([(start, end)])

    def premap_drops(self, runs: Sequence[tuple[int, int]]) -> int:
        """:meth:`premap_drop` for a drop of several runs of regions, dropped in this order
        (``drop_layers`` once per run puts each run's chunks after the previous run's)."""
        for start, end in runs:
            self.arena.check_layers(start, end, dropped=False)
        return self.kv.premap([c for a, b in runs for c in self.arena.layer_chunks(a, b)])

    def evacuate_for_restore(
        self, start: int, end: int, block_tables: Iterable[list[int]]
    ) -> dict[int, int] | None:
        """Moves live KV blocks out of the chunks that restoring ``[start, end)`` takes back;
        see ``KVPool.evacuate`` (None: too few free blocks below, nothing changed)."""
        self.arena.check_layers(start, end, dropped=True)
        n = sum(k for _, k in self._restore_plan(start, end))
        return self.kv.evacuate(n, block_tables)

    def restore_layers(
        self, start: int, end: int, source: WeightSource | None, *, lazy: bool = True
    ) -> RestoreStats:
        """Takes the KV tail back for layers ``[start, end)`` and refills them from ``source``.

        The KV pool shrinks by exactly the layers' bytes, in one step; then, layer by layer in
        ``restore_order``, the tail chunks whose slots add up to the layer's are mapped under
        it (kept as they are where a lazy drop left them mapped) and its refill is enqueued, so
        later layers' remaps overlap earlier layers' copies. Eagerly the whole tail is unmapped
        from the KV range first (one device sync); lazily it stays mapped there as stale
        aliases, past ``num_blocks``, until ``flush``. Raises, changing nothing,
        EvacuationNeeded while live blocks lie in that tail, and ValueError when a layer's
        bytes do not end on a chunk boundary of the tail (chunks are given back whole).
        """
        t0 = time.perf_counter()
        self.arena.check_layers(start, end, dropped=True)
        plan = self._restore_plan(start, end)
        n = sum(k for _, k in plan)
        live = self.kv.live_tail_blocks(n)
        if live:
            raise EvacuationNeeded(live)
        before = self.kv.num_blocks
        tail = self.kv.shrink(n, unmap=not lazy)  # one shrink for every layer
        for layer, k in plan:
            chunks, tail = tail[-k:], tail[:-k]
            self.arena.restore_layers(layer, layer + 1, chunks, source)
        nbytes = self.arena.layer_nbytes(start, end)
        return RestoreStats(n, nbytes, before - self.kv.num_blocks, time.perf_counter() - t0)

    def restores_in_place(self, runs: Sequence[tuple[int, int]]) -> set[int]:
        """Of the dropped layers of ``runs`` (restored one run after the other, in this order,
        as ``restore_layers`` does), those whose chunks a lazy restore adopts where they are
        mapped now, under the layer's own slots (the lazy drop's alias): bytes written through
        their weight views before the restore are the bytes the restored layer holds. Changes
        nothing; raises ValueError as ``restore_layers`` would for these runs."""
        lives, kept = self.kv.live_chunks(), set()
        for start, end in runs:
            self.arena.check_layers(start, end, dropped=True)
            plan = self._restore_plan(start, end, lives)
            for layer, k in plan:
                chunks, lives = lives[len(lives) - k :], lives[: len(lives) - k]
                first, count = self.arena.layout.layer_run(layer, layer + 1)
                want, slot = [], first
                for c in chunks:
                    want.append((slot, c.index))
                    slot += c.num_slots
                try:
                    mapped = self.arena.range.mappings(first, first + count)
                except ValueError:  # a mapping crosses the layer's edge: not its own chunk
                    continue
                if [(s, c.index) for s, c in mapped] == want:
                    kept.add(layer)
        return kept

    def _restore_plan(
        self, start: int, end: int, lives: Sequence[Chunk] | None = None
    ) -> list[tuple[int, int]]:
        """``[(layer, tail chunks it takes)]`` in ``restore_order``: each layer takes the KV
        tail's last chunks (of ``lives``, default the KV pool's live chunks) whose slots add up
        to its own. Raises ValueError when they do not add up exactly, or when nothing would be
        left in the KV pool."""
        lives = self.kv.live_chunks() if lives is None else list(lives)
        i, plan = len(lives), []
        for layer in restore_order(start, end):
            want, got, k = self.arena.num_layer_slots(layer, layer + 1), 0, 0
            while got < want and k < i:
                k += 1
                got += lives[i - k].num_slots
            if got != want:
                raise ValueError(
                    f"layer {layer} needs {want} slots back; the KV tail's chunks give {got} "
                    "(chunks are given back whole)"
                )
            plan.append((layer, k))
            i -= k
        if i < 1:
            raise ValueError(f"restoring layers [{start}, {end}) would leave the KV pool empty")
        return plan

    def _num_calls(self) -> int:
        return sum(self.backend.calls.values())

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
