"""The CUDA VMM backend: ``ChunkBackend`` over ``cuda.bindings.driver`` (kernels/vmm.py).

Calls, costs and pitfalls: memory-systems.md §6 (primary context, sync before unmap, whole
mappings only, one ``cuMemSetAccess`` per run). ``cuda.bindings`` is imported when a backend is
made, so this module imports without cuda-python.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch

from kernels.vmm import CHUNK_BYTES, Chunk, ChunkBackend, VmmError


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
    by default); a chunk of ``n`` slots is one ``cuMemCreate`` of ``n * chunk_bytes``.
    ``batched_unmap`` is probed at start-up: whether one ``cuMemUnmap`` may span several
    adjacent mappings; if not, runs are unmapped chunk by chunk (~16 µs each on H200). Every
    driver call is counted in ``calls`` by name (``cuCtxGetCurrent`` included: one per
    operation). Raises VmmError when the device lacks VMM support or a driver call fails.
    """

    def __init__(self, ordinal: int = 0, chunk_bytes: int | None = None) -> None:
        self.cu = cu = _driver()
        self.device, self._ctx = torch.device("cuda", ordinal), None
        self.calls: Counter[str] = Counter()
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
        self.calls[name] += 1
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
                self.unmap_run(base, chunks)
            return ok
        finally:
            self.free_reservation(base, 2 * self.chunk_bytes)
            self.release_chunks(chunks)

    def create_chunks(self, n: int, num_slots: int = 1) -> list[Chunk]:
        self._ensure_context()
        out: list[Chunk] = []
        nbytes = num_slots * self.chunk_bytes
        try:
            for _ in range(n):
                handle = self._call("cuMemCreate", nbytes, self._prop, 0)
                out.append(Chunk(self._next_index, nbytes, handle, num_slots))
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
        at, done = addr, []
        try:
            for c in chunks:
                self._call("cuMemMap", at, c.nbytes, 0, c.handle, 0)
                done.append(c)
                at += c.nbytes
            self._call("cuMemSetAccess", addr, at - addr, [self._access], 1)
        except VmmError:
            self._unmap_each(addr, done)  # leave the run as it was: nothing mapped
            raise

    def unmap_run(self, addr: int, chunks: Sequence[Chunk]) -> None:
        self._ensure_context()
        if self.batched_unmap:
            self._call("cuMemUnmap", addr, sum(c.nbytes for c in chunks))
            return
        self._unmap_each(addr, chunks)

    def _unmap_each(self, addr: int, chunks: Sequence[Chunk]) -> None:
        for c in chunks:
            self._call("cuMemUnmap", addr, c.nbytes)
            addr += c.nbytes

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
