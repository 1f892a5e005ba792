"""The VMM remapper: physical chunks mapped into reserved virtual ranges, seen as torch tensors.

Every byte of weights and KV on a GPU comes from a pool of fixed-size physical chunks (2 MiB,
the CUDA VMM granularity on Hopper) mapped into reserved virtual-address ranges (DESIGN §5). A
chunk can be unmapped from one range and mapped into another with its bytes intact: that is
how dropped weight layers become KV cache without a copy (Oneiros, arXiv 2507.11507; the
elastic KV of vTensor/GLakeServe and kvcached). Facts, costs and pitfalls: memory-systems.md §6.

Layers::

    ChunkPool      counts pre-created chunks (leased or free); never on the request path
    VirtualRange   one reservation split into chunk-sized slots; map / unmap runs; tensor views
    ChunkBackend   the primitives: CudaVmmBackend (cuda.bindings.driver) or EmulatedBackend (CPU)

``EmulatedBackend`` (kernels/vmm_emulated.py) gives CPU tests the same semantics over Linux
shared memory, with zero-copy views (its docstring explains the choice).

A chunk may be mapped in two ranges at once (CUDA's virtual aliasing): the stores use this to
map a chunk into its new range first and unmap the old alias later, off the critical path.

``cuda.bindings.driver`` is imported lazily, so this module imports without cuda-python.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

CHUNK_BYTES = 2 << 20
"""Physical chunk size in bytes: the CUDA VMM minimum and recommended granularity on H100/H200."""


class VmmError(RuntimeError):
    """A driver (or emulated) VMM call failed: ``call`` names it, ``code`` is the error name."""

    def __init__(self, call: str, code: str, detail: str = "") -> None:
        self.call, self.code = call, code
        super().__init__(f"{call}({detail}) failed: {code}")


@dataclass(eq=False)
class Chunk:
    """One physical chunk of ``nbytes`` bytes; ``index`` is unique per backend. ``handle`` is
    the backend's: a ``CUmemGenericAllocationHandle``, or a byte offset in the emulated memfd."""

    index: int
    nbytes: int
    handle: Any


class ChunkBackend(ABC):
    """The VMM primitives of one device. Contract for callers (``VirtualRange``, ``ChunkPool``):

    - addresses and sizes are multiples of ``chunk_bytes``; a run is consecutive chunk slots;
    - ``map_run`` targets slots that are reserved and not mapped; it maps every chunk and
      grants read-write access, or maps nothing and raises ``VmmError``;
    - ``unmap_run`` covers whole earlier mappings only; the caller has synchronized the device
      (or proved no queued work touches the run) before calling it;
    - a chunk may be mapped in several places; ``release_chunks`` is legal while mapped (the
      memory goes once the last mapping is gone), but callers release only unmapped chunks.
    Calls come from one thread at a time per backend.
    """

    chunk_bytes: int
    device: torch.device

    @abstractmethod
    def create_chunks(self, n: int) -> list[Chunk]:
        """Commits ``n`` chunks of physical memory. Raises VmmError (e.g. out of memory)."""

    @abstractmethod
    def release_chunks(self, chunks: Sequence[Chunk]) -> None:
        """Gives the chunks' physical memory back to the device."""

    @abstractmethod
    def reserve(self, nbytes: int) -> int:
        """Reserves ``nbytes`` of virtual addresses (chunk-aligned); returns the base address."""

    @abstractmethod
    def free_reservation(self, base: int, nbytes: int) -> None:
        """Frees a whole reservation; nothing may be mapped in it."""

    @abstractmethod
    def map_run(self, addr: int, chunks: Sequence[Chunk]) -> None:
        """Maps ``chunks`` at ``addr, addr + chunk_bytes, ...`` and grants read-write access."""

    @abstractmethod
    def unmap_run(self, addr: int, count: int) -> None:
        """Unmaps ``count`` consecutive chunk mappings starting at ``addr``."""

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
    """One reservation of ``num_slots`` chunk-sized slots, each empty or mapping one chunk.

    The base address never moves while the range lives, so tensors, kernels and CUDA graphs
    that hold pointers into it stay valid across remaps (as long as what they touch is mapped
    when they run). Raises ValueError for slot runs that are out of range, already mapped
    (``map``) or not mapped (``unmap``), and for views that are out of range or misaligned.
    """

    def __init__(self, backend: ChunkBackend, num_slots: int, name: str = "range") -> None:
        if num_slots < 1:
            raise ValueError(f"{name}: num_slots must be >= 1, got {num_slots}")
        self.backend, self.name, self.num_slots = backend, name, num_slots
        self.chunk_bytes = backend.chunk_bytes
        self.base = backend.reserve(num_slots * self.chunk_bytes)
        self._slots: list[Chunk | None] = [None] * num_slots

    @property
    def nbytes(self) -> int:
        return self.num_slots * self.chunk_bytes

    @property
    def num_mapped(self) -> int:
        return sum(c is not None for c in self._slots)

    def chunk_at(self, slot: int) -> Chunk | None:
        self._check_run(slot, 1)
        return self._slots[slot]

    def mapped_slots(self, lo: int = 0, hi: int | None = None) -> list[tuple[int, Chunk]]:
        """``(slot, chunk)`` of every mapped slot in ``[lo, hi)``, ascending."""
        hi = self.num_slots if hi is None else hi
        self._check_run(lo, hi - lo)
        return [(lo + i, c) for i, c in enumerate(self._slots[lo:hi]) if c is not None]

    def is_mapped(self, first: int, count: int) -> bool:
        """True when every slot of ``[first, first + count)`` maps a chunk."""
        self._check_run(first, count)
        return all(c is not None for c in self._slots[first : first + count])

    def map(self, first: int, chunks: Sequence[Chunk]) -> None:
        """Maps ``chunks`` into slots ``[first, first + len(chunks))``, access in one call."""
        self._check_run(first, len(chunks))
        busy = [first + i for i, c in enumerate(self._slots[first : first + len(chunks)]) if c]
        if busy:
            raise ValueError(f"{self.name}: slots {busy[:8]} are already mapped")
        if not chunks:
            return
        self.backend.map_run(self._addr(first), chunks)
        self._slots[first : first + len(chunks)] = list(chunks)

    def remap(self, first: int, chunks: Sequence[Chunk]) -> int:
        """Makes slots ``[first, first + len(chunks))`` map exactly ``chunks``; returns how many
        were newly mapped. A slot that already maps its chunk is kept, with no driver call
        (a chunk left here by a lazy unmap is adopted back); a slot that maps another chunk is
        unmapped first, after a device sync."""
        self._check_run(first, len(chunks))
        have = self._slots[first : first + len(chunks)]
        stale = [
            first + i for i, (h, c) in enumerate(zip(have, chunks, strict=True)) if h and h is not c
        ]
        if stale:
            self.backend.synchronize()
            for s, n in slot_runs(stale):
                self.unmap(s, n, sync=False)  # synchronized just above
        todo = [first + i for i, h in enumerate(self._slots[first : first + len(chunks)]) if not h]
        for s, n in slot_runs(todo):
            self.map(s, chunks[s - first : s - first + n])
        return len(todo)

    def unmap(self, first: int, count: int, *, sync: bool = True) -> list[Chunk]:
        """Unmaps slots ``[first, first + count)`` and returns their chunks, in slot order.

        Synchronizes the device first (unmapping under in-flight kernels is an illegal
        address). ``sync=False`` is for callers that synchronized already and queued nothing
        since that touches these slots; they must say why where they call it.
        """
        self._check_run(first, count)
        empty = [first + i for i, c in enumerate(self._slots[first : first + count]) if not c]
        if empty:
            raise ValueError(f"{self.name}: slots {empty[:8]} are not mapped")
        if count == 0:
            return []
        if sync:
            self.backend.synchronize()
        self.backend.unmap_run(self._addr(first), count)
        out = [c for c in self._slots[first : first + count] if c is not None]
        self._slots[first : first + count] = [None] * count
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
        out: list[Chunk] = []
        self.backend.synchronize()
        for first, count in slot_runs([i for i, c in enumerate(self._slots) if c is not None]):
            out.extend(self.unmap(first, count, sync=False))  # synchronized just above
        self.backend.free_reservation(self.base, self.nbytes)
        self.num_slots, self._slots = 0, []
        return out

    def _addr(self, slot: int) -> int:
        return self.base + slot * self.chunk_bytes

    def _check_run(self, first: int, count: int) -> None:
        if count < 0 or first < 0 or first + count > self.num_slots:
            raise ValueError(
                f"{self.name}: slots [{first}, {first + count}) are outside [0, {self.num_slots})"
            )


def slot_runs(slots: list[int]) -> list[tuple[int, int]]:
    """Sorted slot ids -> [(first, count)] of consecutive runs."""
    out: list[tuple[int, int]] = []
    for s in slots:
        if out and out[-1][0] + out[-1][1] == s:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((s, 1))
    return out


class ChunkPool:
    """Pre-created physical chunks of one device, each free or leased to a range's owner.

    Creating chunks commits memory (``cuMemCreate``) and is slow on some GPUs, so it happens
    once at start-up; moving memory between the weight arena and the KV pool only leases and
    returns chunks. ``take`` returns None (taking nothing) when too few are free.
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
    def nbytes(self) -> int:
        return self.num_chunks * self.backend.chunk_bytes

    def free_chunks(self) -> list[Chunk]:
        return list(self._free)

    def create(self, n: int) -> None:
        """Commits ``n`` more chunks (free). Raises VmmError when the device is out of memory."""
        if n < 0:
            raise ValueError(f"cannot create {n} chunks")
        new = self.backend.create_chunks(n)
        self._all.update((c.index, c) for c in new)
        self._free.extend(new)

    def take(self, n: int) -> list[Chunk] | None:
        """Leases ``n`` free chunks, or returns None when fewer are free."""
        if n < 0:
            raise ValueError(f"cannot take {n} chunks")
        if n > len(self._free):
            return None
        out, self._free = self._free[:n], self._free[n:]
        return out

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
        return CudaVmmBackend(device.index or 0, chunk_bytes)
    if device.type == "cpu":
        from kernels.vmm_emulated import EmulatedBackend

        return EmulatedBackend(chunk_bytes or CHUNK_BYTES)
    raise ValueError(f"no VMM backend for device {device}: expected cuda or cpu")


# ----------------------------------------------------------------------------- CUDA backend


def _driver() -> Any:
    """``cuda.bindings.driver`` (cuda-python >= 12.6), or the older ``cuda.cuda`` module."""
    try:
        import cuda.bindings.driver as drv
    except ImportError:
        try:
            from cuda import cuda as drv  # cuda-python < 12.6
        except ImportError as e:
            raise ImportError(
                "the CUDA VMM backend needs cuda-python: pip install cuda-bindings"
            ) from e
    return drv


def _check(result: tuple, call: str, detail: str = "") -> Any:
    """Returns the outputs of a cuda.bindings call ``(CUresult, *outputs)`` or raises VmmError."""
    err = result[0]
    if int(err) != 0:
        raise VmmError(call, getattr(err, "name", str(err)), detail)
    if len(result) == 1:
        return None
    return result[1] if len(result) == 2 else result[1:]


def _describe(args: tuple) -> str:
    """Driver-call arguments for an error message: addresses in hex, objects by type."""
    return ", ".join(
        (f"{a:#x}" if a >= 1 << 32 else str(a)) if isinstance(a, int) else type(a).__name__
        for a in args
    )


class _CudaArray:
    """Minimal ``__cuda_array_interface__`` (v3) owner of a byte range, for ``torch.as_tensor``."""

    def __init__(self, addr: int, nbytes: int) -> None:
        cai = {"shape": (nbytes,), "typestr": "|u1", "data": (addr, False), "version": 3}
        self.__cuda_array_interface__ = cai


class CudaVmmBackend(ChunkBackend):
    """VMM on one CUDA device through ``cuda.bindings.driver``.

    The device's primary context (the one torch uses) is retained and made current on the
    calling thread at the start of every operation (memory-systems.md §6.5 pitfall 1). Chunks
    are pinned device memory of ``chunk_bytes`` (a multiple of the minimum granularity, 2 MiB
    by default). ``batched_unmap`` is probed at start-up: whether one ``cuMemUnmap`` may span
    several adjacent mappings; if not, runs are unmapped chunk by chunk (~17.5 µs each on H200).
    Raises VmmError when the device lacks VMM support or a driver call fails.
    """

    def __init__(self, ordinal: int = 0, chunk_bytes: int | None = None) -> None:
        self.cu = cu = _driver()
        self.device, self._ctx = torch.device("cuda", ordinal), None
        self._call("cuInit", 0)
        self._dev = self._call("cuDeviceGet", ordinal)
        attr = cu.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED
        if not self._call("cuDeviceGetAttribute", attr, self._dev):
            raise VmmError("cuDeviceGetAttribute", "VMM not supported", f"device {ordinal}")
        self._ctx = self._call("cuDevicePrimaryCtxRetain", self._dev)
        self._ensure_context()
        self._prop = prop = cu.CUmemAllocationProp()
        prop.type = cu.CUmemAllocationType.CU_MEM_ALLOCATION_TYPE_PINNED
        prop.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        prop.location.id = ordinal
        flag = cu.CUmemAllocationGranularity_flags.CU_MEM_ALLOC_GRANULARITY_MINIMUM
        self.granularity = self._call("cuMemGetAllocationGranularity", prop, flag)
        self.chunk_bytes = chunk_bytes or max(CHUNK_BYTES, self.granularity)
        if self.chunk_bytes % self.granularity:
            raise ValueError(
                f"chunk_bytes {self.chunk_bytes} is not a multiple of {self.granularity}"
            )
        self._access = acc = cu.CUmemAccessDesc()
        acc.location.type = cu.CUmemLocationType.CU_MEM_LOCATION_TYPE_DEVICE
        acc.location.id = ordinal
        acc.flags = cu.CUmemAccess_flags.CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        self._next_index = 0
        self.batched_unmap = self._probe_batched_unmap()

    def _call(self, name: str, *args: Any) -> Any:
        result = getattr(self.cu, name)(*args)
        if int(result[0]) != 0:  # describe the arguments only on failure (hot path: ~µs)
            _check(result, name, _describe(args))
        return _check(result, name)

    def _ensure_context(self) -> None:
        if int(self._call("cuCtxGetCurrent")) != int(self._ctx):
            self._call("cuCtxSetCurrent", self._ctx)

    def _probe_batched_unmap(self) -> bool:
        """Maps two chunks side by side and tries one cuMemUnmap over both."""
        chunks, base = self.create_chunks(2), self.reserve(2 * self.chunk_bytes)
        try:
            self.map_run(base, chunks)
            ok = int(self.cu.cuMemUnmap(base, 2 * self.chunk_bytes)[0]) == 0  # result is the answer
            if not ok:
                self.batched_unmap = False
                self.unmap_run(base, 2)
            return ok
        finally:
            self.free_reservation(base, 2 * self.chunk_bytes)
            self.release_chunks(chunks)

    def create_chunks(self, n: int) -> list[Chunk]:
        self._ensure_context()
        out: list[Chunk] = []
        try:
            for _ in range(n):
                handle = self._call("cuMemCreate", self.chunk_bytes, self._prop, 0)
                out.append(Chunk(self._next_index, self.chunk_bytes, handle))
                self._next_index += 1
        except VmmError:
            self.release_chunks(out)
            raise
        return out

    def release_chunks(self, chunks: Sequence[Chunk]) -> None:
        self._ensure_context()
        for c in chunks:
            self._call("cuMemRelease", c.handle)

    def reserve(self, nbytes: int) -> int:
        self._ensure_context()
        return int(self._call("cuMemAddressReserve", nbytes, self.chunk_bytes, 0, 0))

    def free_reservation(self, base: int, nbytes: int) -> None:
        self._ensure_context()
        self._call("cuMemAddressFree", base, nbytes)

    def map_run(self, addr: int, chunks: Sequence[Chunk]) -> None:
        self._ensure_context()
        cb, done = self.chunk_bytes, 0
        try:
            for i, c in enumerate(chunks):
                self._call("cuMemMap", addr + i * cb, cb, 0, c.handle, 0)
                done += 1
            self._call("cuMemSetAccess", addr, len(chunks) * cb, [self._access], 1)
        except VmmError:
            for i in range(done):  # leave the run as it was: nothing mapped
                self._call("cuMemUnmap", addr + i * cb, cb)
            raise

    def unmap_run(self, addr: int, count: int) -> None:
        self._ensure_context()
        cb = self.chunk_bytes
        if self.batched_unmap:
            self._call("cuMemUnmap", addr, count * cb)
            return
        for i in range(count):
            self._call("cuMemUnmap", addr + i * cb, cb)

    def synchronize(self) -> None:
        self._ensure_context()
        self._call("cuCtxSynchronize")

    def byte_view(self, addr: int, nbytes: int) -> torch.Tensor:
        return torch.as_tensor(_CudaArray(addr, nbytes), device=self.device)

    def mem_get_info(self) -> tuple[int, int]:
        self._ensure_context()
        free, total = self._call("cuMemGetInfo")
        return int(free), int(total)

    def close(self) -> None:
        if self._ctx is not None:
            self._call("cuDevicePrimaryCtxRelease", self._dev)
            self._ctx = None
