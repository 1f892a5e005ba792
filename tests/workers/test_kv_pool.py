"""KV pool capacity changes: grow, shrink of a free tail, evacuation, and drop/restore through
``WorkerMemory``; the block pool's new capacity methods. CPU over the emulated VMM backend; the
``gpu`` tests run the same moves on CUDA VMM (CUDA graphs, free memory)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import pytest
import torch

from kernels.vmm import ChunkBackend, ChunkPool, CudaVmmBackend
from kernels.vmm_emulated import EmulatedBackend
from workers.block_pool import BlockPool
from workers.kv_pool import EvacuationNeeded, KVBlockFormat, KVPool
from workers.memory import WorkerMemory
from workers.weight_arena import ArenaLayout, HostCopy

CHUNK = 64 << 10
FMT = KVBlockFormat(
    layers_per_block=2, block_size=4, num_kv_heads=2, head_dim=64, dtype=torch.float32
)
"""8 KiB blocks: 8 per emulated chunk."""
ODD = KVBlockFormat(
    layers_per_block=3, block_size=4, num_kv_heads=2, head_dim=64, dtype=torch.float32
)
"""12 KiB blocks: chunk boundaries cut through blocks."""


@pytest.fixture
def backend() -> Iterator[ChunkBackend]:
    b = EmulatedBackend(CHUNK)
    yield b
    b.close()


def make_kv(
    backend: ChunkBackend, chunks: int = 2, max_chunks: int = 8, fmt: KVBlockFormat = FMT
) -> tuple[ChunkPool, KVPool]:
    pool = ChunkPool(backend, max_chunks)
    return pool, KVPool(backend, fmt, pool.take(chunks) or [], max_chunks)


def make_memory(
    backend: ChunkBackend, kv_chunks: int = 2, fmt: KVBlockFormat = FMT, max_kv: int | None = None
) -> WorkerMemory:
    """4 decoder layers of 2 chunks each (one 96 KiB weight), plus embed and head regions."""
    f32 = torch.float32
    groups = [("embed", None, [("embed.weight", (1000,), f32)])]
    groups += [(f"layer.{i}", i, [(f"layers.{i}.w", (96 * 256,), f32)]) for i in range(4)]
    groups += [("head", None, [("head.weight", (1000,), f32)])]
    layout = ArenaLayout.build(groups, backend.chunk_bytes)
    return WorkerMemory(backend, layout, fmt, kv_chunks, max_kv)


# ---------------------------------------------------------------- BlockPool capacity methods


def test_block_pool_grows_at_the_tail() -> None:
    pool = BlockPool(3)
    assert pool.allocate(3) == [0, 1, 2]
    pool.grow(2)
    assert (pool.num_blocks, pool.num_free) == (5, 2)
    assert pool.allocate(2) == [3, 4]
    pool.check_integrity()


def test_block_pool_shrinks_only_a_free_tail() -> None:
    pool = BlockPool(6)
    pool.allocate(5)
    pool.free([0, 3])
    assert pool.used_ids(2, 6) == [2, 4]
    assert pool.shrink_tail(2) is False  # block 4 is live
    assert pool.num_blocks == 6
    pool.free([4])
    assert pool.shrink_tail(3) is True
    assert (pool.num_blocks, pool.num_free) == (3, 1)
    assert pool.allocate(1) == [0]
    pool.check_integrity()
    with pytest.raises(ValueError, match="cannot shrink 3 blocks by 3"):
        pool.shrink_tail(3)


def test_block_pool_evacuates_used_ids_below_keeping_ref_counts() -> None:
    pool = BlockPool(8)
    pool.allocate(8)
    pool.free([1, 2, 3, 4])  # free list: 1, 2, 3, 4
    pool._ref_counts[6] = 2  # a shared block
    assert pool.evacuate(5) == {5: 1, 6: 2, 7: 3}
    assert (pool._ref_counts[2], pool.used_ids(5, 8)) == (2, [])
    assert pool.shrink_tail(3) is True
    assert pool.num_free == 1
    pool.check_integrity()


def test_block_pool_evacuation_short_of_room_changes_nothing() -> None:
    pool = BlockPool(6)
    pool.allocate(6)
    pool.free([0])
    assert pool.evacuate(4) is None
    assert (pool.num_free, pool.used_ids(4, 6)) == (1, [4, 5])
    pool.check_integrity()


# ------------------------------------------------------------------------------- KVPool


def test_kv_pool_capacity_is_the_whole_blocks_of_the_mapped_prefix(backend: ChunkBackend) -> None:
    pool, kv = make_kv(backend, chunks=2, fmt=ODD)
    assert (ODD.block_bytes, kv.num_blocks, kv.max_blocks) == (12288, 10, 42)  # 128 KiB // 12 KiB
    assert kv.kv_cache.shape == (10, 3, 2, 4, 2, 64)
    assert kv.kv_cache.data_ptr() == kv.kv_cache_full.data_ptr() == kv.base
    assert kv.grow(pool.take(1) or []) == 6  # 192 KiB hold 16 blocks
    assert (kv.num_blocks, kv.mapped_bytes) == (16, 3 * CHUNK)
    assert kv.kv_cache.data_ptr() == kv.base
    kv.check_integrity()
    pool.give(kv.close())
    pool.close()


def test_kv_pool_shrink_refuses_live_blocks_then_evacuation_lets_it(backend: ChunkBackend) -> None:
    pool, kv = make_kv(backend, chunks=3)
    a = kv.block_pool.allocate(3)  # [0, 1, 2]
    kv.block_pool.allocate(20)  # [3 .. 22]
    kv.block_pool.free(list(range(5, 16)))  # leaves 3, 4, 16..22 live
    b_live = [3, 4, *range(16, 23)]
    for i in b_live:
        kv.kv_cache[i].fill_(float(i))
    with pytest.raises(EvacuationNeeded, match=r"7 live KV blocks \(first \[16, 17, 18"):
        kv.shrink(1)
    assert (kv.num_chunks, kv.num_blocks) == (3, 24)
    table = list(b_live)
    moves = kv.evacuate(1, [table, a])
    assert moves == {16: 5, 17: 6, 18: 7, 19: 8, 20: 9, 21: 10, 22: 11}
    assert table == [3, 4, 5, 6, 7, 8, 9, 10, 11] and a == [0, 1, 2]
    assert [float(kv.kv_cache[i].mean()) for i in table] == [float(i) for i in b_live]
    chunks = kv.shrink(1)
    assert (len(chunks), kv.num_chunks, kv.num_blocks) == (1, 2, 16)
    kv.check_integrity()
    pool.give(chunks + kv.close())
    pool.close()


def test_kv_pool_rejects_bad_sizes(backend: ChunkBackend) -> None:
    pool = ChunkPool(backend, 4)
    huge = KVBlockFormat(8, 16, 2, 64, torch.float32)  # 128 KiB blocks
    one = pool.take(1) or []
    with pytest.raises(ValueError, match="1 slots of 65536 bytes hold no KV block of 131072"):
        KVPool(backend, huge, one, 4)
    with pytest.raises(ValueError, match="the KV pool needs chunks of 1..4 slots, got 0"):
        KVPool(backend, FMT, [], 4)
    with pytest.raises(ValueError, match="block pool has 3 blocks, chunks hold 8"):
        KVPool(backend, FMT, one, 4, BlockPool(3))
    kv = KVPool(backend, FMT, one + (pool.take(1) or []), 3)
    two = pool.take(2) or []
    with pytest.raises(ValueError, match="KV range of 3 slots cannot grow from 2 by 2"):
        kv.grow(two)
    with pytest.raises(ValueError, match=r"cannot give back 2 of 2 KV chunks \(keep >= 1\)"):
        kv.shrink(2)
    with pytest.raises(ValueError, match="head_dim must be >= 1, got 0"):
        KVBlockFormat(1, 16, 2, 0, torch.float32)
    pool.give(kv.close() + two)
    pool.close()


# ---------------------------------------------------------------- drop / restore (memory)


def count_calls(backend: ChunkBackend) -> dict[str, int]:
    """Counts the backend's map_run / unmap_run / synchronize calls from now on."""
    counts = dict.fromkeys(("map_run", "unmap_run", "synchronize"), 0)
    for name in counts:
        original = getattr(backend, name)

        def counted(*args: object, _original=original, _name=name) -> object:  # noqa: ANN001
            counts[_name] += 1
            return _original(*args)

        setattr(backend, name, counted)
    return counts


@pytest.mark.parametrize("lazy", [True, False])
def test_drop_grows_kv_by_exactly_the_freed_bytes(backend: ChunkBackend, lazy: bool) -> None:
    mem = make_memory(backend, kv_chunks=2)
    blocks, mapped = mem.kv.num_blocks, mem.kv.mapped_bytes
    freed = mem.arena.layer_nbytes(2, 4)
    stats = mem.drop_layers(2, 4, lazy=lazy)
    assert (freed, stats.nbytes, stats.num_chunks) == (4 * CHUNK, 4 * CHUNK, 2)  # a chunk a layer
    assert mem.kv.mapped_bytes - mapped == freed
    assert mem.kv.num_blocks - blocks == stats.blocks_added == freed // FMT.block_bytes == 32
    assert mem.arena.dropped == {2, 3}
    assert len(mem.arena.stale_chunks()) == (2 if lazy else 0)
    mem.check_integrity()
    mem.close()


@pytest.mark.parametrize("lazy", [True, False])
def test_restore_refuses_until_evacuated_then_returns_the_same_capacity(
    backend: ChunkBackend, lazy: bool
) -> None:
    mem = make_memory(backend, kv_chunks=2)
    original = (mem.kv.num_blocks, mem.kv.mapped_bytes)
    layer2 = mem.arena.tensor("layers.2.w")
    layer2.copy_(torch.arange(layer2.numel(), dtype=torch.float32))
    host = HostCopy(mem.arena, 2, 4)
    mem.drop_layers(2, 4, lazy=lazy)
    ids = mem.kv.block_pool.allocate(40)  # reaches into the borrowed chunks
    mem.kv.block_pool.free(ids[:30])  # 30 free below, 10 live (ids 30..39) above
    live = ids[30:]
    for i in live:
        mem.kv.kv_cache[i].fill_(float(i))
    with pytest.raises(EvacuationNeeded, match="10 live KV blocks"):
        mem.restore_layers(2, 4, host, lazy=lazy)
    assert (mem.arena.dropped, mem.kv.num_blocks) == ({2, 3}, 48)
    moves = mem.evacuate_for_restore(2, 4, [live])
    assert sorted(moves.values()) == live and all(v < 16 for v in live)
    assert [float(mem.kv.kv_cache[i].mean()) for i in live] == [float(i) for i in ids[30:]]
    mem.restore_layers(2, 4, host, lazy=lazy)
    assert (mem.kv.num_blocks, mem.kv.mapped_bytes) == original
    assert len(mem.kv.stale_chunks()) == (2 if lazy else 0)
    assert mem.arena.dropped == set()
    assert torch.equal(
        mem.arena.tensor("layers.2.w"), torch.arange(layer2.numel(), dtype=torch.float32)
    )
    mem.check_integrity()
    mem.close()


def test_lazy_drop_and_restore_make_no_unmap_and_restore_adopts_its_chunks(
    backend: ChunkBackend,
) -> None:
    mem = make_memory(backend, kv_chunks=2)
    layer3 = mem.arena.layer_chunks(3, 4)
    calls = count_calls(backend)
    mem.drop_layers(2, 4)
    assert calls == {"map_run": 1, "unmap_run": 0, "synchronize": 0}  # one run into the KV
    mem.restore_layers(2, 4, None)
    assert calls == {"map_run": 1, "unmap_run": 0, "synchronize": 0}  # adopted back
    assert mem.arena.layer_chunks(3, 4) == layer3
    mem.check_integrity()
    mem.drop_layers(2, 4)  # the KV adopts its stale tail back as well
    assert calls == {"map_run": 1, "unmap_run": 0, "synchronize": 0}
    assert mem.flush() == 2  # the weight aliases, one chunk a layer
    assert calls == {"map_run": 1, "unmap_run": 1, "synchronize": 1}
    mem.restore_layers(2, 4, None)  # now the chunks must really be mapped again
    assert (calls["map_run"], len(mem.kv.stale_chunks()), mem.flush()) == (3, 2, 2)
    mem.check_integrity()
    mem.close()


def test_restores_out_of_drop_order_swap_chunks_and_keep_the_weights(backend: ChunkBackend) -> None:
    mem = make_memory(backend, kv_chunks=2)
    for i in range(4):
        mem.arena.tensor(f"layers.{i}.w").fill_(float(i + 1))
    host = HostCopy(mem.arena, 0, 4)
    mem.drop_layers(2, 4)
    mem.drop_layers(0, 2)  # the KV tail now holds layers 0 and 1's chunks
    mem.kv.kv_cache.fill_(-1.0)
    mem.restore_layers(2, 4, host)  # gets layers 0 and 1's chunks, still aliased under them
    mem.check_integrity()
    mem.restore_layers(0, 2, host)
    mem.check_integrity()
    assert [float(mem.arena.tensor(f"layers.{i}.w").mean()) for i in range(4)] == [
        1.0,
        2.0,
        3.0,
        4.0,
    ]
    assert mem.flush() == 4  # the KV's stale tail; the arena's swapped aliases went on restore
    mem.close()


def test_kv_grows_into_new_chunks_after_start_up(backend: ChunkBackend) -> None:
    mem = make_memory(backend, kv_chunks=1, max_kv=40)
    assert (mem.kv.num_blocks, mem.kv.range.num_slots, mem.pool.num_slots) == (8, 40, 11)
    assert mem.pool.num_chunks == 7  # one a region (embed, 4 layers, head), one for the KV
    assert mem.add_kv_slots(20) == 160
    assert (mem.kv.num_blocks, mem.pool.num_slots, mem.pool.num_chunks) == (168, 31, 8)
    mem.drop_layers(0, 4)  # 8 more chunks still fit the 40 reserved
    assert mem.kv.num_blocks == 232
    mem.check_integrity()
    mem.close()


def test_drop_and_restore_reject_bad_layer_ranges(backend: ChunkBackend) -> None:
    mem = make_memory(backend)
    with pytest.raises(
        ValueError, match=r"layer range \[3, 5\) is empty or outside the held \[0, 4\)"
    ):
        mem.drop_layers(3, 5)
    with pytest.raises(ValueError, match=r"layer range \[2, 2\) is empty"):
        mem.drop_layers(2, 2)
    with pytest.raises(ValueError, match=r"layers \[1\] are held: cannot restore them"):
        mem.restore_layers(1, 2, None)
    mem.drop_layers(1, 2)
    with pytest.raises(ValueError, match=r"layers \[1\] are dropped: cannot drop them"):
        mem.drop_layers(0, 2)
    with pytest.raises(ValueError, match="layers.1.w: layer 1 is dropped"):
        mem.arena.tensor("layers.1.w")
    mem.add_kv_slots(7)  # the KV range (12 slots) now has room for 1 more slot
    with pytest.raises(ValueError, match="room for 1 more slots, layers need 2"):
        mem.drop_layers(0, 1, lazy=False)
    assert mem.arena.dropped == {1}
    mem.check_integrity()
    mem.close()


def calls_since(backend: ChunkBackend, before: Counter[str]) -> dict[str, int]:
    return {k: v - before[k] for k, v in backend.calls.items() if v != before[k]}


def test_a_drop_maps_one_chunk_per_layer_with_one_access_call(backend: ChunkBackend) -> None:
    mem = make_memory(backend, kv_chunks=2)
    before = Counter(backend.calls)
    stats = mem.drop_layers(0, 4)
    assert calls_since(backend, before) == {"cuMemMap": 4, "cuMemSetAccess": 1}
    assert (stats.driver_calls, stats.num_chunks, stats.nbytes) == (5, 4, 8 * CHUNK)
    mem.restore_layers(0, 4, None)  # adopts the chunks back: no call
    assert calls_since(backend, before) == {"cuMemMap": 4, "cuMemSetAccess": 1}
    mem.flush()
    before = Counter(backend.calls)
    stats = mem.drop_layers(0, 4, lazy=False)  # one batched unmap of the 4 layers first
    assert calls_since(backend, before) == {"cuMemUnmap": 1, "cuMemMap": 4, "cuMemSetAccess": 1}
    assert stats.driver_calls == 6
    mem.check_integrity()
    mem.close()


def test_a_premapped_drop_makes_no_driver_call_and_keeps_the_bytes(backend: ChunkBackend) -> None:
    mem = make_memory(backend, kv_chunks=2)
    mem.arena.tensor("layers.3.w").fill_(3.0)
    assert mem.premap_drop(2, 4) == 2
    assert (mem.kv.num_blocks, len(mem.kv.stale_chunks())) == (16, 2)
    mem.check_integrity()
    stats = mem.drop_layers(2, 4)
    assert (stats.driver_calls, stats.blocks_added) == (0, 32)
    assert bool((mem.kv.kv_cache[32:44] == 3.0).all())  # layer 3's 96 KiB, at slot 4
    mem.restore_layers(2, 4, None)
    assert float(mem.arena.tensor("layers.3.w").mean()) == 3.0
    mem.check_integrity()
    mem.close()


def test_capacity_changes_by_exactly_the_layer_bytes_when_blocks_straddle_chunks(
    backend: ChunkBackend,
) -> None:
    mem = make_memory(backend, kv_chunks=3, fmt=ODD)  # 12 KiB blocks, 64 KiB slots
    counts = [mem.kv.num_blocks]
    for layers in ((3, 4), (1, 3)):
        mem.drop_layers(*layers)
        counts.append(mem.kv.num_blocks)
    for layers in ((1, 3), (3, 4)):
        mem.restore_layers(*layers, None, lazy=False)
        counts.append(mem.kv.num_blocks)
    assert counts == [16, 26, 48, 26, 16]  # 192, 320, 576, 320, 192 KiB // 12 KiB
    assert mem.kv.mapped_bytes == 3 * CHUNK
    mem.check_integrity()
    mem.close()


def test_restore_refuses_a_kv_tail_that_does_not_end_on_the_layers_chunks(
    backend: ChunkBackend,
) -> None:
    mem = make_memory(backend, kv_chunks=2, max_kv=40)
    mem.drop_layers(2, 4)
    mem.add_kv_slots(3)  # the KV's own chunk now ends the tail
    with pytest.raises(ValueError, match="layer 3 needs 2 slots back; the KV tail's chunks give 3"):
        mem.restore_layers(2, 4, None)
    assert (mem.arena.dropped, mem.kv.mapped_slots) == ({2, 3}, 9)
    with pytest.raises(ValueError, match="do not end 131072 bytes before its end"):
        mem.kv.tail_count(2 * CHUNK)
    assert mem.kv.tail_count(3 * CHUNK) == 1
    mem.check_integrity()
    mem.close()


def test_ensure_kv_blocks_adds_one_zeroed_chunk_rounded_to_slots(backend: ChunkBackend) -> None:
    mem = make_memory(backend, kv_chunks=1, max_kv=40)
    assert (mem.kv.num_blocks, mem.ensure_kv_blocks(5)) == (8, 0)
    mem.kv.kv_cache.fill_(7.0)
    before = Counter(backend.calls)
    assert mem.ensure_kv_blocks(20) == 16  # 160 KiB -> 3 slots -> 24 blocks
    assert calls_since(backend, before) == {"cuMemCreate": 1, "cuMemMap": 1, "cuMemSetAccess": 1}
    kv = mem.kv.kv_cache
    assert (kv.shape[0], bool((kv[:8] == 7.0).all()), bool((kv[8:] == 0.0).all())) == (
        24,
        True,
        True,
    )
    mem.check_integrity()
    mem.close()


# --------------------------------------------------------------------------------- GPU


@pytest.fixture
def cuda_backend() -> Iterator[ChunkBackend]:
    pytest.importorskip("cuda.bindings")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    torch.zeros(1, device="cuda")
    b = CudaVmmBackend(0)
    yield b
    b.close()


@pytest.mark.gpu
def test_gpu_cuda_graph_over_the_kv_pool_stays_valid_after_it_grows(
    cuda_backend: ChunkBackend,
) -> None:
    fmt = KVBlockFormat(4, 16, 8, 128, torch.bfloat16)  # 256 KiB blocks, 8 per chunk
    pool, kv = make_kv(cuda_backend, chunks=1, max_chunks=4, fmt=fmt)
    full = kv.kv_cache_full
    idx = torch.zeros(1, dtype=torch.int64, device="cuda")
    val = torch.zeros((1, *fmt.shape), dtype=fmt.dtype, device="cuda")
    out = torch.zeros((), dtype=torch.float32, device="cuda")

    def step() -> None:  # write block idx, then read it back
        full.index_copy_(0, idx, val)
        out.copy_(full.index_select(0, idx).float().sum())

    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    assert kv.grow(pool.take(2) or []) == 16
    idx.fill_(20)  # a block in the chunks mapped after capture
    val.fill_(3.0)
    graph.replay()
    torch.cuda.synchronize()
    assert float(out) == 3.0 * val.numel()
    assert bool((kv.kv_cache[20] == 3.0).all())
    assert kv.kv_cache.data_ptr() == kv.base
    pool.give(kv.close())
    pool.close()


@pytest.mark.gpu
def test_gpu_free_memory_returns_after_drop_restore_and_teardown(
    cuda_backend: ChunkBackend,
) -> None:
    torch.cuda.empty_cache()
    start = cuda_backend.mem_get_info()[0]
    mem = make_memory(cuda_backend, kv_chunks=4)
    w = mem.arena.tensor("layers.1.w")
    w.normal_()
    expected = w.clone()  # torch memory, taken before the baseline below
    host = HostCopy(mem.arena, 0, 4)
    torch.cuda.synchronize()
    created = cuda_backend.mem_get_info()[0]
    assert start - created >= mem.pool.nbytes
    mem.drop_layers(0, 4)
    mem.kv.kv_cache.fill_(1.0)
    torch.cuda.synchronize()
    assert abs(cuda_backend.mem_get_info()[0] - created) < cuda_backend.chunk_bytes
    mem.restore_layers(0, 4, host)
    torch.cuda.synchronize()
    assert torch.equal(mem.arena.tensor("layers.1.w"), expected)
    del w, expected
    mem.check_integrity()
    mem.close()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    assert abs(cuda_backend.mem_get_info()[0] - start) < cuda_backend.chunk_bytes
