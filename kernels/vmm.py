"""The VMM remapper: physical chunks mapped into reserved virtual ranges, seen as torch tensors.

Every byte of weights and KV on a GPU comes from physical chunks mapped into reserved
virtual-address ranges (DESIGN §5). A chunk is one physical allocation (``cuMemCreate``) of a
whole number of **slots**, the 2 MiB CUDA VMM granularity on Hopper (``chunk_bytes``); it is
mapped with one ``cuMemMap`` and can be unmapped from one range and mapped into another with
its bytes intact: that is how dropped weight layers become KV cache without a copy (Oneiros,
arXiv 2507.11507; the elastic KV of vTensor/GLakeServe and kvcached). Driver calls cost per
call and per mapping (memory-systems.md §6.3: ~23 µs per 2 MiB mapping with its access), so
the stores use few, large chunks: one per weight-arena region (a decoder layer) and one per KV
growth, and one ``cuMemSetAccess`` per contiguous run of new mappings. Facts, costs and
pitfalls: memory-systems.md §6.

Layers::

    ChunkPool      counts pre-created chunks (leased or free); never on the request path
    VirtualRange   one reservation split into slots; map / unmap whole chunks; tensor views
    ChunkBackend   the primitives: CudaVmmBackend (cuda.bindings.driver) or EmulatedBackend (CPU)

``CudaVmmBackend`` lives in kernels/vmm_cuda.py (importable from here too); ``EmulatedBackend``
(kernels/vmm_emulated.py) gives CPU tests the same semantics over Linux shared memory, with
zero-copy views (its docstring explains the choice).

A chunk may be mapped in two ranges at once (CUDA's virtual aliasing): the stores use this to
map a chunk into its new range first and unmap the old alias later, off the critical path.

``cuda.bindings.driver`` is imported lazily, so this module imports without cuda-python.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

CHUNK_BYTES = 2 << 20
"""Slot size in bytes (the mapping granularity and the smallest chunk): the CUDA VMM minimum
and recommended granularity on H100/H200."""


class VmmError(RuntimeError):
    """A driver (or emulated) VMM call failed: ``call`` names it, ``code`` is the error name."""

    def __init__(self, call: str, code: str, detail: str = "") -> None:
        self.call, self.code = call, code
        super().__init__(f"{call}({detail}) failed: {code}")


@dataclass(eq=False)
class Chunk:
    """One physical allocation of ``num_slots`` slots (``nbytes`` bytes); ``index`` is unique
    per backend. ``handle`` is the backend's: a ``CUmemGenericAllocationHandle``, or a byte
    offset in the emulated memfd. A chunk is mapped and unmapped whole."""

    index: int
    nbytes: int
    handle: Any
    num_slots: int = 1


class ChunkBackend(ABC):
    """The VMM primitives of one device. Contract for callers (``VirtualRange``, ``ChunkPool``):

    - addresses and sizes are multiples of ``chunk_bytes`` (the slot); a run is chunks mapped
      back to back from one address;
    - ``map_run`` targets slots that are reserved and not mapped; it maps every chunk and
      grants read-write access with one call over the run, or maps nothing and raises
      ``VmmError``;
    - ``unmap_run`` covers whole earlier mappings only; the caller has synchronized the device
      (or proved no queued work touches the run) before calling it;
    - a chunk may be mapped in several places; ``release_chunks`` is legal while mapped (the
      memory goes once the last mapping is gone), but callers release only unmapped chunks.
    Calls come from one thread at a time per backend. ``calls`` counts the driver calls made
    (by name; the emulated backend counts the calls it stands in for).
    """

    chunk_bytes: int
    device: torch.device
    calls: Counter[str]

    @abstractmethod
    def create_chunks(self, n: int, num_slots: int = 1) -> list[Chunk]:
        """Commits ``n`` chunks of ``num_slots`` slots each (one ``cuMemCreate`` per chunk).
        Raises VmmError (e.g. out of memory), having created nothing."""

    @abstractmethod
    def release_chunks(self, chunks: Sequence[Chunk]) -> None:
        """Gives the chunks' physical memory back to the device."""

    @abstractmethod
    def reserve(self, nbytes: int) -> int:
        """Reserves ``nbytes`` of virtual addresses (slot-aligned); returns the base address."""

    @abstractmethod
    def free_reservation(self, base: int, nbytes: int) -> None:
        """Frees a whole reservation; nothing may be mapped in it."""

    @abstractmethod
    def map_run(self, addr: int, chunks: Sequence[Chunk]) -> None:
        """Maps ``chunks`` back to back from ``addr`` (one ``cuMemMap`` each) and grants
        read-write access over the whole run (one ``cuMemSetAccess``)."""

    @abstractmethod
    def unmap_run(self, addr: int, chunks: Sequence[Chunk]) -> None:
        """Unmaps ``chunks``, mapped back to back from ``addr``."""

    @abstractmethod
    def synchronize(self) -> None:
        """Waits for all work queued on the device (no-op on CPU)."""

    @abstractmethod
    def byte_view(self, addr: int, nbytes: int) -> torch.Tensor:
        """A zero-copy ``[nbytes]`` uint8 tensor at ``addr``; ``addr`` must be mapped."""

    @abstractmethod
    def mem_get_info(self) -> tuple[int, int]:
        """(free, total) physical bytes of the device, as ``cuMemGetInfo`` reports them."""

    def close(self) -> None:  # noqa: B027 (optional hook)
        """Drops backend-wide resources; every chunk and reservation must be gone first."""


class VirtualRange:
    """One reservation of ``num_slots`` slots; each chunk mapped in it covers ``num_slots`` of
    them, and a slot is empty or part of one mapping.

    The base address never moves while the range lives, so tensors, kernels and CUDA graphs
    that hold pointers into it stay valid across remaps (as long as what they touch is mapped
    when they run). Raises ValueError for slot runs that are out of range, already mapped
    (``map``), not mapped or cutting through a mapping (``unmap``), and for views that are out
    of range or misaligned.
    """

    def __init__(self, backend: ChunkBackend, num_slots: int, name: str = "range") -> None:
        if num_slots < 1:
            raise ValueError(f"{name}: num_slots must be >= 1, got {num_slots}")
        self.backend, self.name, self.num_slots = backend, name, num_slots
        self.chunk_bytes = backend.chunk_bytes
        self.base = backend.reserve(num_slots * self.chunk_bytes)
        self._start: list[int | None] = [None] * num_slots  # first slot of the slot's mapping
        self._heads: dict[int, Chunk] = {}  # first slot -> the chunk mapped there

    @property
    def nbytes(self) -> int:
        return self.num_slots * self.chunk_bytes

    @property
    def num_mapped(self) -> int:
        """Mapped slots."""
        return sum(c.num_slots for c in self._heads.values())

    def chunk_at(self, slot: int) -> Chunk | None:
        """The chunk whose mapping covers ``slot``, or None."""
        self._check_run(slot, 1)
        first = self._start[slot]
        return None if first is None else self._heads[first]

    def mappings(self, lo: int = 0, hi: int | None = None) -> list[tuple[int, Chunk]]:
        """``(first slot, chunk)`` of every mapping inside slots ``[lo, hi)``, ascending.
        Raises ValueError when a mapping crosses ``lo`` or ``hi``."""
        hi = self.num_slots if hi is None else hi
        self._check_run(lo, hi - lo)
        self._check_edges(lo, hi)
        return sorted((s, c) for s, c in self._heads.items() if lo <= s < hi)

    def is_mapped(self, first: int, count: int) -> bool:
        """True when every slot of ``[first, first + count)`` is mapped."""
        self._check_run(first, count)
        return all(s is not None for s in self._start[first : first + count])

    def map(self, first: int, chunks: Sequence[Chunk]) -> None:
        """Maps ``chunks`` back to back from slot ``first``, access in one call."""
        count = sum(c.num_slots for c in chunks)
        self._check_run(first, count)
        busy = [
            first + i for i, s in enumerate(self._start[first : first + count]) if s is not None
        ]
        if busy:
            raise ValueError(f"{self.name}: slots {busy[:8]} are already mapped")
        if not chunks:
            return
        self.backend.map_run(self._addr(first), chunks)
        slot = first
        for c in chunks:
            self._heads[slot] = c
            self._start[slot : slot + c.num_slots] = [slot] * c.num_slots
            slot += c.num_slots

    def remap(self, first: int, chunks: Sequence[Chunk]) -> int:
        """Makes the range map exactly ``chunks`` back to back from slot ``first``; returns how
        many chunks were newly mapped. A chunk already mapped at its place is kept, with no
        driver call (a chunk left there by a lazy unmap is adopted back); any other mapping
        over those slots is unmapped whole first, after a device sync, even where it reaches
        past them (callers own the slots around the run: a KV tail, a dropped layer)."""
        targets, slot = [], first
        for c in chunks:
            targets.append((slot, c))
            slot += c.num_slots
        self._check_run(first, slot - first)
        kept = {s for s, c in targets if self._heads.get(s) is c}
        stale = sorted(
            {self._start[i] for s, c in targets if s not in kept for i in range(s, s + c.num_slots)}
            - {None}
            - kept
        )
        if stale:
            self.backend.synchronize()
            for s in stale:
                self.unmap(s, self._heads[s].num_slots, sync=False)  # synchronized just above
        todo = [(s, c) for s, c in targets if s not in kept]
        for run in _adjacent(todo):
            self.map(run[0][0], [c for _, c in run])
        return len(todo)

    def unmap(self, first: int, count: int, *, sync: bool = True) -> list[Chunk]:
        """Unmaps slots ``[first, first + count)``, which must hold whole mappings, and returns
        their chunks in slot order.

        Synchronizes the device first (unmapping under in-flight kernels is an illegal
        address). ``sync=False`` is for callers that synchronized already and queued nothing
        since that touches these slots; they must say why where they call it.
        """
        self._check_run(first, count)
        empty = [first + i for i, s in enumerate(self._start[first : first + count]) if s is None]
        if empty:
            raise ValueError(f"{self.name}: slots {empty[:8]} are not mapped")
        if count == 0:
            return []
        self._check_edges(first, first + count)
        out = [c for s, c in sorted(self._heads.items()) if first <= s < first + count]
        if sync:
            self.backend.synchronize()
        self.backend.unmap_run(self._addr(first), out)
        for s in range(first, first + count):
            self._heads.pop(s, None)
        self._start[first : first + count] = [None] * count
        return out

    def unmap_within(self, lo: int, hi: int, *, sync: bool = True) -> list[Chunk]:
        """Unmaps every mapping inside slots ``[lo, hi)`` (adjacent ones in one backend call
        each run, after one device sync unless ``sync=False``); returns their chunks."""
        runs = _adjacent(self.mappings(lo, hi))
        if runs and sync:
            self.backend.synchronize()
        out: list[Chunk] = []
        for run in runs:
            count = sum(c.num_slots for _, c in run)
            out.extend(self.unmap(run[0][0], count, sync=False))  # synchronized above or by caller
        return out

    def view(
        self,
        offset: int,
        shape: Sequence[int],
        dtype: torch.dtype,
        *,
        require_mapped: bool = True,
    ) -> torch.Tensor:
        """A zero-copy tensor of ``shape``/``dtype`` at byte ``offset`` of the range.

        The first byte must be mapped (torch looks up the device of the data pointer); with
        ``require_mapped=False`` the rest may lie over unmapped slots, which nobody may touch
        until they are mapped (the KV pool's full-capacity view).
        """
        nbytes = math.prod(shape) * dtype.itemsize
        if offset < 0 or offset % dtype.itemsize or offset + nbytes > self.nbytes:
            raise ValueError(
                f"{self.name}: view of {nbytes} bytes at offset {offset} does not fit "
                f"{self.nbytes} bytes aligned to {dtype.itemsize}"
            )
        if nbytes == 0:
            return torch.empty(tuple(shape), dtype=dtype, device=self.backend.device)
        first, last = offset // self.chunk_bytes, (offset + nbytes - 1) // self.chunk_bytes
        needed = last - first + 1 if require_mapped else 1
        if not self.is_mapped(first, needed):
            raise ValueError(f"{self.name}: view at offset {offset} covers unmapped slots")
        raw = self.backend.byte_view(self.base + offset, nbytes)
        return raw.view(dtype).view(tuple(shape))

    def close(self) -> list[Chunk]:
        """Unmaps everything (after a device sync), frees the reservation, returns the chunks."""
        self.backend.synchronize()
        out = self.unmap_within(0, self.num_slots, sync=False)  # synchronized just above
        self.backend.free_reservation(self.base, self.nbytes)
        self.num_slots, self._start, self._heads = 0, [], {}
        return out

    def _addr(self, slot: int) -> int:
        return self.base + slot * self.chunk_bytes

    def _check_run(self, first: int, count: int) -> None:
        if count < 0 or first < 0 or first + count > self.num_slots:
            raise ValueError(
                f"{self.name}: slots [{first}, {first + count}) are outside [0, {self.num_slots})"
            )

    def _check_edges(self, lo: int, hi: int) -> None:
        """Raises ValueError when a mapping crosses slot ``lo`` or ``hi`` (a boundary inside
        one chunk: CUDA maps and unmaps chunks whole)."""
        for edge in (lo, hi):
            if 0 < edge < self.num_slots:
                inside = self._start[edge]
                if inside is not None and inside != edge:
                    raise ValueError(
                        f"{self.name}: slot {edge} lies inside the chunk mapped at slot {inside}"
                    )


def _adjacent(mappings: Sequence[tuple[int, Chunk]]) -> list[list[tuple[int, Chunk]]]:
    """Ascending ``(first slot, chunk)`` -> runs in which each chunk starts where the last ends."""
    runs: list[list[tuple[int, Chunk]]] = []
    for s, c in mappings:
        if runs and runs[-1][-1][0] + runs[-1][-1][1].num_slots == s:
            runs[-1].append((s, c))
        else:
            runs.append([(s, c)])
    return runs


class ChunkPool:
    """Pre-created physical chunks of one device, each free or leased to a range's owner.

    Creating chunks commits memory (``cuMemCreate``) and is slow on some GPUs, so it happens
    at start-up (and when the KV cache is sized); moving memory between the weight arena and
    the KV pool only leases and returns chunks. ``take`` returns None (taking nothing) when too
    few chunks of the size asked for are free.
    """

    def __init__(self, backend: ChunkBackend, num_chunks: int = 0) -> None:
        self.backend = backend
        self._all: dict[int, Chunk] = {}
        self._free: list[Chunk] = []
        self.create(num_chunks)

    @property
    def num_chunks(self) -> int:
        return len(self._all)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_slots(self) -> int:
        """Slots of all chunks, leased or free."""
        return sum(c.num_slots for c in self._all.values())

    @property
    def nbytes(self) -> int:
        return self.num_slots * self.backend.chunk_bytes

    def free_chunks(self) -> list[Chunk]:
        return list(self._free)

    def create(self, n: int, num_slots: int = 1) -> None:
        """Commits ``n`` more chunks of ``num_slots`` slots (free). Raises VmmError when the
        device is out of memory (nothing created), ValueError on negative or empty sizes."""
        if n < 0 or num_slots < 1:
            raise ValueError(f"cannot create {n} chunks of {num_slots} slots")
        new = self.backend.create_chunks(n, num_slots)
        self._all.update((c.index, c) for c in new)
        self._free.extend(new)

    def take(self, n: int, num_slots: int = 1) -> list[Chunk] | None:
        """Leases ``n`` free chunks of exactly ``num_slots`` slots, or returns None when fewer
        are free."""
        if n < 0:
            raise ValueError(f"cannot take {n} chunks")
        fits = [c for c in self._free if c.num_slots == num_slots][:n]
        if len(fits) < n:
            return None
        taken = {c.index for c in fits}
        self._free = [c for c in self._free if c.index not in taken]
        return fits

    def take_slots(self, num_slots: int) -> list[Chunk] | None:
        """Leases chunks covering exactly ``num_slots`` slots: one chunk of that size if one is
        free, else ``num_slots`` one-slot chunks; None (taking nothing) when neither is."""
        return self.take(1, num_slots) or (self.take(num_slots) if num_slots > 1 else None)

    def give(self, chunks: Sequence[Chunk]) -> None:
        """Returns leased chunks. Raises ValueError for foreign or already-free chunks."""
        free = {c.index for c in self._free}
        for c in chunks:
            if self._all.get(c.index) is not c:
                raise ValueError(f"chunk {c.index} does not belong to this pool")
            if c.index in free:
                raise ValueError(f"chunk {c.index} returned while free")
            free.add(c.index)
        self._free.extend(chunks)

    def close(self) -> None:
        """Releases every chunk. Raises ValueError if some are still leased."""
        if len(self._free) != len(self._all):
            raise ValueError(f"{len(self._all) - len(self._free)} chunks are still leased")
        self.backend.release_chunks(self._free)
        self._all, self._free = {}, []

    def check_integrity(self) -> None:
        """Raises AssertionError if the free list holds duplicates or foreign chunks."""
        assert len({c.index for c in self._free}) == len(self._free), "a chunk is free twice"
        assert all(self._all.get(c.index) is c for c in self._free), "a foreign chunk is free"


def make_backend(device: torch.device | str, chunk_bytes: int | None = None) -> ChunkBackend:
    """CudaVmmBackend for a CUDA device, EmulatedBackend for CPU. Raises ValueError otherwise."""
    device = torch.device(device)
    if device.type == "cuda":
        from kernels.vmm_cuda import CudaVmmBackend

        return CudaVmmBackend(device.index or 0, chunk_bytes)
    if device.type == "cpu":
        from kernels.vmm_emulated import EmulatedBackend

        return EmulatedBackend(chunk_bytes or CHUNK_BYTES)
    raise ValueError(f"no VMM backend for device {device}: expected cuda or cpu")


def __getattr__(name: str) -> Any:
    """``CudaVmmBackend`` and the driver helpers, from kernels/vmm_cuda.py on first use."""
    if name in ("CudaVmmBackend", "_check", "_driver"):
        from kernels import vmm_cuda

        return getattr(vmm_cuda, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
