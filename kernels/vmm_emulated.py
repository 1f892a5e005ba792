"""An emulated VMM backend for CPU: CUDA VMM semantics over Linux shared memory.

A chunk of ``n`` slots is a page-aligned piece of ``n * chunk_bytes`` of one ``memfd``; a
reservation is a ``PROT_NONE`` anonymous mapping; mapping a chunk is one
``mmap(MAP_FIXED | MAP_SHARED)`` of its piece at its first slot, with no access until one
``mprotect`` over the run (as ``cuMemMap`` per chunk, then one ``cuMemSetAccess``); unmapping
puts a bare ``PROT_NONE`` reservation back. ``calls`` counts the driver calls each of these
stands in for, so CPU tests can assert how many a drop makes. Tensor views are therefore zero-copy on CPU too: a view over a
range always shows the current bytes of the chunks mapped under it, one chunk may be mapped in
two ranges at once, a remapped chunk keeps its bytes, and touching an unmapped slot faults
(SIGSEGV) as the GPU would (illegal address).

Why not the simpler emulation where a chunk is a 2 MiB tensor and a range a list of slots?
Its multi-chunk views must either be split per contiguous run (callers then see several
tensors where the GPU has one, so the KV pool could not hand the attention kernels one
``kv_cache``) or copied into a staging tensor (writes through the view no longer reach the
chunks). Either would make the CPU path a second mechanism rather than a second backend. The
price of this one is that it runs on Linux only.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence

import torch

from kernels.vmm import CHUNK_BYTES, Chunk, ChunkBackend, VmmError

_PROT_NONE, _PROT_RW = 0, 3
_MAP_SHARED, _MAP_PRIVATE, _MAP_FIXED, _MAP_ANON, _MAP_NORESERVE = 0x01, 0x02, 0x10, 0x20, 0x4000
_FALLOC_PUNCH_HOLE = 0x01 | 0x02  # FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE


def _libc() -> ctypes.CDLL:
    ptr, size, i32, off = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_long
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ptr
    libc.mmap.argtypes = [ptr, size, i32, i32, i32, off]
    libc.munmap.argtypes = [ptr, size]
    libc.mprotect.argtypes = [ptr, size, i32]
    libc.fallocate.argtypes = [i32, i32, off, off]
    return libc


class EmulatedBackend(ChunkBackend):
    """VMM over host shared memory, with CUDA's semantics (see the module docstring).

    ``capacity_bytes`` plays the device's memory size: ``create_chunks`` past it raises
    VmmError("cuMemCreate", "CUDA_ERROR_OUT_OF_MEMORY") and ``mem_get_info`` reports it.
    Released pieces of the memfd are punched out and reused by chunks of the same size.
    ``chunk_bytes`` must be a multiple of the host page size (tests use 64 KiB). Linux only.
    """

    def __init__(self, chunk_bytes: int = CHUNK_BYTES, capacity_bytes: int = 64 << 30) -> None:
        if not sys.platform.startswith("linux"):
            raise VmmError("EmulatedBackend", "needs Linux (memfd, mmap MAP_FIXED)")
        if chunk_bytes <= 0 or chunk_bytes % mmap.PAGESIZE:
            raise ValueError(
                f"chunk_bytes {chunk_bytes} is not a multiple of the page size {mmap.PAGESIZE}"
            )
        self.device, self.chunk_bytes = torch.device("cpu"), chunk_bytes
        self.capacity_bytes, self.batched_unmap = capacity_bytes, True
        self._libc = _libc()
        self._fd = os.memfd_create("kunserve-vmm-chunks")
        self._file_bytes, self._live_bytes, self._next_index = 0, 0, 0
        self._free_offsets: defaultdict[int, list[int]] = defaultdict(list)  # nbytes -> offsets
        self.calls: Counter[str] = Counter()

    def _sys(self, result: int, call: str, detail: str) -> int:
        if result in (-1, ctypes.c_void_p(-1).value, None):
            raise VmmError(call, os.strerror(ctypes.get_errno()), detail)
        return result

    def create_chunks(self, n: int, num_slots: int = 1) -> list[Chunk]:
        nbytes = num_slots * self.chunk_bytes
        if self._live_bytes + n * nbytes > self.capacity_bytes:
            raise VmmError("cuMemCreate", "CUDA_ERROR_OUT_OF_MEMORY", f"{n} x {nbytes}")
        out, free = [], self._free_offsets[nbytes]
        for _ in range(n):
            if not free:
                free.append(self._file_bytes)
                self._file_bytes += nbytes
                os.ftruncate(self._fd, self._file_bytes)
            out.append(Chunk(self._next_index, nbytes, free.pop(), num_slots))
            self._next_index += 1
        self._live_bytes += n * nbytes
        self.calls["cuMemCreate"] += n
        return out

    def release_chunks(self, chunks: Sequence[Chunk]) -> None:
        for c in chunks:  # drop the pages now, as cuMemRelease does once nothing maps them
            got = self._libc.fallocate(self._fd, _FALLOC_PUNCH_HOLE, c.handle, c.nbytes)
            self._sys(got, "cuMemRelease", f"chunk {c.index}")
            self._free_offsets[c.nbytes].append(c.handle)
            self._live_bytes -= c.nbytes
        self.calls["cuMemRelease"] += len(chunks)

    def reserve(self, nbytes: int) -> int:
        flags = _MAP_PRIVATE | _MAP_ANON | _MAP_NORESERVE
        self.calls["cuMemAddressReserve"] += 1
        return self._sys(
            self._libc.mmap(None, nbytes, _PROT_NONE, flags, -1, 0), "reserve", f"{nbytes}"
        )

    def free_reservation(self, base: int, nbytes: int) -> None:
        self._sys(self._libc.munmap(base, nbytes), "munmap", f"{base:#x}, {nbytes}")
        self.calls["cuMemAddressFree"] += 1

    def map_run(self, addr: int, chunks: Sequence[Chunk]) -> None:
        at = addr
        try:
            for c in chunks:  # mapped with no access, as cuMemMap leaves it
                got = self._libc.mmap(
                    at, c.nbytes, _PROT_NONE, _MAP_SHARED | _MAP_FIXED, self._fd, c.handle
                )
                self._sys(got, "cuMemMap", f"{at:#x}")
                self.calls["cuMemMap"] += 1
                at += c.nbytes
            n = at - addr
            self._sys(self._libc.mprotect(addr, n, _PROT_RW), "cuMemSetAccess", f"{addr:#x}, {n}")
            self.calls["cuMemSetAccess"] += 1
        except VmmError:
            self._bare(addr, sum(c.nbytes for c in chunks))  # leave the run a bare reservation
            raise

    def unmap_run(self, addr: int, chunks: Sequence[Chunk]) -> None:
        self._bare(addr, sum(c.nbytes for c in chunks))
        self.calls["cuMemUnmap"] += 1  # batched, as the H200 driver allows

    def _bare(self, addr: int, n: int) -> None:
        """Puts a bare ``PROT_NONE`` reservation over ``[addr, addr + n)``."""
        flags = _MAP_PRIVATE | _MAP_ANON | _MAP_NORESERVE | _MAP_FIXED
        self._sys(
            self._libc.mmap(addr, n, _PROT_NONE, flags, -1, 0), "cuMemUnmap", f"{addr:#x}, {n}"
        )

    def synchronize(self) -> None:
        """Nothing runs asynchronously on the host."""

    def byte_view(self, addr: int, nbytes: int) -> torch.Tensor:
        return torch.frombuffer((ctypes.c_uint8 * nbytes).from_address(addr), dtype=torch.uint8)

    def mem_get_info(self) -> tuple[int, int]:
        return self.capacity_bytes - self._live_bytes, self.capacity_bytes

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
