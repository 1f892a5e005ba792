"""The VMM remapper: chunks keep their bytes across remaps, views alias the chunks, bad ranges
raise. Every test runs on the emulated backend (CPU) and, marked ``gpu``, on CUDA VMM."""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Iterator

import pytest
import torch

from kernels.vmm import (
    ChunkBackend,
    ChunkPool,
    CudaVmmBackend,
    VirtualRange,
    VmmError,
    _check,
    make_backend,
)
from kernels.vmm_emulated import EmulatedBackend

EMULATED_CHUNK = 64 << 10


@pytest.fixture(params=["emulated", pytest.param("cuda", marks=pytest.mark.gpu)])
def backend(request: pytest.FixtureRequest) -> Iterator[ChunkBackend]:
    """An emulated backend with 64 KiB chunks, or CUDA VMM on GPU 0 (2 MiB chunks)."""
    if request.param == "cuda":
        pytest.importorskip("cuda.bindings")
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device")
        torch.zeros(1, device="cuda")  # torch's primary context first, as a worker has it
        b: ChunkBackend = CudaVmmBackend(0)
    else:
        b = EmulatedBackend(EMULATED_CHUNK, capacity_bytes=64 * EMULATED_CHUNK)
    yield b
    b.close()


def floats(backend: ChunkBackend, chunks: int = 1) -> int:
    """float32 elements in ``chunks`` chunks."""
    return chunks * backend.chunk_bytes // 4


def fill_each_chunk(rng: VirtualRange, first: int, values: list[float]) -> None:
    n = floats(rng.backend)
    for i, v in enumerate(values):
        rng.view((first + i) * rng.chunk_bytes, (n,), torch.float32).fill_(v)


def chunk_values(rng: VirtualRange, first: int, count: int) -> list[float]:
    """The value of each chunk of a run, asserting each chunk holds one value throughout."""
    n, out = floats(rng.backend), []
    for i in range(count):
        v = rng.view((first + i) * rng.chunk_bytes, (n,), torch.float32)
        assert bool((v == v[0]).all()), f"slot {first + i} holds mixed values"
        out.append(float(v[0]))
    return out


def test_map_then_view_reads_and_writes(backend: ChunkBackend) -> None:
    pool = ChunkPool(backend, 2)
    rng = VirtualRange(backend, 4)
    rng.map(1, pool.take(2))
    v = rng.view(backend.chunk_bytes, (2, floats(backend)), torch.float32)
    v.copy_(torch.arange(v.numel(), dtype=torch.float32).view(v.shape))
    assert v.data_ptr() == rng.base + backend.chunk_bytes
    assert float(v.sum()) == float(torch.arange(v.numel(), dtype=torch.float64).sum())
    assert (rng.num_mapped, rng.is_mapped(1, 2), rng.is_mapped(0, 2)) == (2, True, False)
    pool.give(rng.close())
    pool.close()


def test_remapped_chunks_keep_their_bytes(backend: ChunkBackend) -> None:
    pool = ChunkPool(backend, 3)
    weights, kv = VirtualRange(backend, 3, "weights"), VirtualRange(backend, 8, "kv")
    weights.map(0, pool.take(3))
    fill_each_chunk(weights, 0, [1.0, 2.0, 3.0])
    chunks = weights.unmap(1, 2)  # drop two chunks ...
    kv.map(5, list(reversed(chunks)))  # ... and map them, swapped, at the end of the KV range
    assert chunk_values(kv, 5, 2) == [3.0, 2.0]
    assert chunk_values(weights, 0, 1) == [1.0]
    pool.give(kv.close() + weights.close())
    pool.close()


def test_a_view_shows_whatever_chunk_is_mapped_under_it(backend: ChunkBackend) -> None:
    pool = ChunkPool(backend, 2)
    a, b = VirtualRange(backend, 1, "a"), VirtualRange(backend, 1, "b")
    first, second = pool.take(2)
    a.map(0, [first])
    view = a.view(0, (floats(backend),), torch.float32)  # taken once, kept across remaps
    view.fill_(1.0)
    b.map(0, [first])  # one chunk in two ranges: writes through either show in both
    b.view(0, (floats(backend),), torch.float32).fill_(7.0)
    assert float(view[-1]) == 7.0
    a.unmap(0, 1)
    a.map(0, [second])
    view.fill_(4.0)  # the same view now lands in ``second``; ``first`` keeps its bytes
    assert chunk_values(b, 0, 1) == [7.0]
    assert chunk_values(a, 0, 1) == [4.0]
    pool.give(a.close() + b.close())
    pool.close()


def test_remap_keeps_matching_slots_and_replaces_the_rest(backend: ChunkBackend) -> None:
    pool = ChunkPool(backend, 4)
    a, b, c, d = pool.take(4) or []
    rng = VirtualRange(backend, 4)
    rng.map(0, [a, b])
    assert rng.remap(0, [a, c, d]) == 2  # slot 0 kept, slot 1 replaced, slot 2 mapped
    assert [rng.chunk_at(i) for i in range(4)] == [a, c, d, None]
    pool.give(rng.close() + [b])
    pool.close()


def test_a_view_over_remapped_chunks_computes_like_a_plain_tensor(backend: ChunkBackend) -> None:
    rows = 2 * backend.chunk_bytes // (4 * 64)  # a [rows, 64] float32 matrix over two chunks
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(rows, 64, generator=gen).to(backend.device)
    x = torch.randn(64, 8, generator=gen).to(backend.device)
    pool = ChunkPool(backend, 2)
    src, dst = VirtualRange(backend, 2, "src"), VirtualRange(backend, 4, "dst")
    src.map(0, pool.take(2))
    src.view(0, (rows, 64), torch.float32).copy_(w)
    dst.map(2, src.unmap(0, 2))
    remapped = dst.view(2 * backend.chunk_bytes, (rows, 64), torch.float32)
    assert torch.equal(remapped, w)
    torch.testing.assert_close(remapped @ x, w @ x)
    pool.give(dst.close())
    src.close()
    pool.close()


MAP_CALLS = ("cuMemCreate", "cuMemMap", "cuMemSetAccess", "cuMemUnmap", "cuMemRelease")


def map_calls(backend: ChunkBackend, before: Counter[str]) -> dict[str, int]:
    """VMM calls that create, map or unmap memory since ``before`` (a copy of ``calls``)."""
    return {k: backend.calls[k] - before[k] for k in MAP_CALLS if backend.calls[k] - before[k]}


def test_a_chunk_of_several_slots_maps_and_moves_whole(backend: ChunkBackend) -> None:
    pool = ChunkPool(backend)
    before = Counter(backend.calls)
    pool.create(1, num_slots=3)
    big = (pool.take(1, 3) or [])[0]
    assert (big.num_slots, big.nbytes, pool.num_slots) == (3, 3 * backend.chunk_bytes, 3)
    rng = VirtualRange(backend, 5, "w")
    rng.map(1, [big])
    assert map_calls(backend, before) == {"cuMemCreate": 1, "cuMemMap": 1, "cuMemSetAccess": 1}
    assert [rng.chunk_at(i) for i in range(5)] == [None, big, big, big, None]
    assert (rng.mappings(), rng.num_mapped) == ([(1, big)], 3)
    fill_each_chunk(rng, 1, [1.0, 2.0, 3.0])  # one value per slot
    with pytest.raises(ValueError, match="w: slot 2 lies inside the chunk mapped at slot 1"):
        rng.unmap(1, 1)  # CUDA unmaps whole mappings only
    with pytest.raises(ValueError, match="slot 2 lies inside the chunk mapped at slot 1"):
        rng.mappings(2, 5)
    other = VirtualRange(backend, 3, "kv")
    other.map(0, rng.unmap(1, 3))
    assert chunk_values(other, 0, 3) == [1.0, 2.0, 3.0]  # remapped whole, bytes kept
    pool.give(other.close() + rng.close())
    pool.close()


def test_remap_unmaps_a_stale_chunk_whole_even_past_the_run(backend: ChunkBackend) -> None:
    pool = ChunkPool(backend, 2)
    pool.create(1, 3)
    big, (a, b) = (pool.take(1, 3) or [])[0], pool.take(2) or []
    rng = VirtualRange(backend, 4)
    rng.map(0, [big])
    assert rng.remap(0, [a, b]) == 2
    assert [rng.chunk_at(i) for i in range(4)] == [a, b, None, None]
    assert rng.remap(0, [a, b]) == 0  # already in place: no driver call
    pool.give(rng.close() + [big])
    pool.close()


def test_take_slots_prefers_one_chunk_of_the_size(backend: ChunkBackend) -> None:
    pool = ChunkPool(backend, 3)
    pool.create(1, 2)
    one, singles = pool.take_slots(2) or [], pool.take_slots(2) or []
    assert ([c.num_slots for c in one], [c.num_slots for c in singles]) == ([2], [1, 1])
    assert (pool.take_slots(2), pool.take(1, 2), pool.num_free) == (None, None, 1)
    assert (pool.num_chunks, pool.num_slots, pool.nbytes) == (4, 5, 5 * backend.chunk_bytes)
    pool.give(one + singles)
    pool.close()


def test_free_memory_returns_after_teardown(backend: ChunkBackend) -> None:
    if backend.device.type == "cuda":
        torch.cuda.empty_cache()
    start, _ = backend.mem_get_info()
    pool = ChunkPool(backend, 8)
    committed = start - backend.mem_get_info()[0]
    assert committed >= 8 * backend.chunk_bytes  # physical memory is committed at create
    rng = VirtualRange(backend, 8)
    rng.map(0, pool.take(8))
    rng.view(0, (floats(backend, 8),), torch.float32).fill_(1.0)
    pool.give(rng.close())
    pool.close()
    if backend.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    assert abs(backend.mem_get_info()[0] - start) < backend.chunk_bytes


def test_bad_slot_runs_raise(backend: ChunkBackend) -> None:
    pool = ChunkPool(backend, 4)
    rng = VirtualRange(backend, 4, "kv")
    rng.map(0, pool.take(2))
    spare = pool.take(2) or []
    with pytest.raises(ValueError, match=r"kv: slots \[3, 5\) are outside \[0, 4\)"):
        rng.map(3, spare)
    with pytest.raises(ValueError, match=r"kv: slots \[1\] are already mapped"):
        rng.map(1, spare)
    with pytest.raises(ValueError, match=r"kv: slots \[2, 3\] are not mapped"):
        rng.unmap(1, 3)
    with pytest.raises(ValueError, match=r"slots \[-1, 0\) are outside"):
        rng.unmap(-1, 1)
    with pytest.raises(ValueError, match="num_slots must be >= 1"):
        VirtualRange(backend, 0)
    assert rng.num_mapped == 2
    pool.give(rng.close() + spare)
    pool.close()


def test_bad_views_raise(backend: ChunkBackend) -> None:
    pool = ChunkPool(backend, 1)
    rng = VirtualRange(backend, 2, "w")
    rng.map(0, pool.take(1))
    cb = backend.chunk_bytes
    with pytest.raises(ValueError, match="does not fit"):
        rng.view(cb, (cb,), torch.float32)  # past the end
    with pytest.raises(ValueError, match="aligned to 4"):
        rng.view(2, (4,), torch.float32)
    with pytest.raises(ValueError, match="w: view at offset 0 covers unmapped slots"):
        rng.view(0, (2 * cb,), torch.uint8)
    with pytest.raises(ValueError, match=f"view at offset {cb} covers unmapped"):
        rng.view(cb, (4,), torch.uint8, require_mapped=False)  # the first byte must be mapped
    assert rng.view(0, (2 * cb,), torch.uint8, require_mapped=False).data_ptr() == rng.base
    pool.give(rng.close())
    pool.close()


def test_pool_counts_leases_and_rejects_foreign_chunks(backend: ChunkBackend) -> None:
    pool, other = ChunkPool(backend, 3), ChunkPool(backend, 1)
    taken = pool.take(2)
    assert (pool.num_chunks, pool.num_free, pool.take(2)) == (3, 1, None)
    foreign = other.take(1) or []
    with pytest.raises(ValueError, match="does not belong to this pool"):
        pool.give(foreign)
    with pytest.raises(ValueError, match="2 chunks are still leased"):
        pool.close()
    pool.give(taken or [])
    with pytest.raises(ValueError, match="returned while free"):
        pool.give((taken or [])[:1])
    with pytest.raises(ValueError, match="cannot take -1 chunks"):
        pool.take(-1)
    pool.check_integrity()
    pool.close()
    other.give(foreign)
    other.close()


def test_out_of_memory_is_a_vmm_error() -> None:
    backend = EmulatedBackend(EMULATED_CHUNK, capacity_bytes=4 * EMULATED_CHUNK)
    pool = ChunkPool(backend, 3)
    with pytest.raises(
        VmmError, match=r"cuMemCreate\(2 x 65536\) failed: CUDA_ERROR_OUT_OF_MEMORY"
    ):
        pool.create(2)
    assert backend.mem_get_info() == (EMULATED_CHUNK, 4 * EMULATED_CHUNK)
    pool.close()
    backend.close()


def test_driver_results_become_vmm_errors() -> None:
    class CUresult(enum.IntEnum):  # stands in for cuda.bindings.driver.CUresult
        CUDA_SUCCESS = 0
        CUDA_ERROR_INVALID_VALUE = 1

    assert _check((CUresult.CUDA_SUCCESS,), "cuMemUnmap") is None
    assert _check((CUresult.CUDA_SUCCESS, 7), "cuMemCreate") == 7
    assert _check((CUresult.CUDA_SUCCESS, 1, 2), "cuMemGetInfo") == (1, 2)
    with pytest.raises(VmmError, match=r"cuMemMap\(0x7f00, 2097152\) failed: CUDA_ERROR_INVALID"):
        _check((CUresult.CUDA_ERROR_INVALID_VALUE,), "cuMemMap", "0x7f00, 2097152")


def test_backend_choice_and_chunk_size_checks() -> None:
    cpu = make_backend("cpu", chunk_bytes=EMULATED_CHUNK)
    assert isinstance(cpu, EmulatedBackend) and cpu.chunk_bytes == EMULATED_CHUNK
    cpu.close()
    with pytest.raises(ValueError, match="no VMM backend for device meta"):
        make_backend("meta")
    with pytest.raises(ValueError, match="not a multiple of the page size"):
        EmulatedBackend(1000)


def test_bench_imports_without_cuda_python() -> None:
    from kernels import bench_vmm

    assert callable(bench_vmm.run_vmm_bench)
