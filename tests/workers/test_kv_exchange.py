"""KV slice copies between workers: the chunked in-place move of the live exchange."""

from __future__ import annotations

import threading

import pytest
import torch

from tests.workers.pipeline_helpers import LoopbackTransport
from workers import kv_exchange
from workers.kv_exchange import SliceCopy
from workers.stalls import PhaseClock

BLOCKS, LAYERS, BS, H, D = 12, 4, 2, 2, 3


class CountingTransport(LoopbackTransport):
    """Loopback, counting the messages each rank sends."""

    def __init__(self, rank: int, links: dict) -> None:
        super().__init__(rank, links, hidden_size=8)
        self.messages = 0

    def send(self, dst: int, t: torch.Tensor, group=None) -> None:
        self.messages += 1
        super().send(dst, t, group)


def _views(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    src = torch.randn(BLOCKS, LAYERS, 2, BS, H, D, generator=g)
    return src, torch.zeros(BLOCKS, 2, 2, BS, H, D)


PLAN = [
    # rank 0's blocks 0-4, layers [2, 4), to rank 1's blocks 7-11 as its layers [0, 2)
    SliceCopy(0, 1, (2, 4), (0, 2), (0, 1, 2, 3, 4), (7, 8, 9, 10, 11)),
    SliceCopy(1, 0, (0, 2), (0, 2), (5, 3, 1), (0, 2, 4)),  # out of order on both ends
    SliceCopy(0, 0, (0, 2), (0, 2), (6, 7, 8, 9), (8, 9, 10, 11)),  # local
    SliceCopy(1, 1, (2, 4), (0, 2), (11,), (0,)),
]


def test_move_in_chunks_writes_every_slice_where_the_plan_says() -> None:
    views = {rank: _views(rank) for rank in (0, 1)}
    links: dict = {}
    transports = {rank: CountingTransport(rank, links) for rank in (0, 1)}
    block_bytes = 2 * 2 * BS * H * D * 4  # two layers of one block, float32
    moved: dict[int, int] = {}
    clocks = {rank: PhaseClock() for rank in (0, 1)}

    def run(rank: int) -> None:
        src, dst = views[rank]
        transport, clock = transports[rank], clocks[rank]
        moved[rank] = kv_exchange.move(PLAN, rank, src, dst, transport, 2 * block_bytes, clock)

    threads = [threading.Thread(target=run, args=(rank,)) for rank in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert moved == {0: 3, 1: 3}
    for c in PLAN:
        src, _ = views[c.src_rank]
        _, dst = views[c.dst_rank]
        (a, b), (x, y) = c.src_layers, c.dst_layers
        for s, d in zip(c.src_blocks, c.dst_blocks, strict=True):
            assert torch.equal(dst[d, x:y], src[s, a:b]), (c, s, d)
    written = {(c.dst_rank, d) for c in PLAN for d in c.dst_blocks}
    for rank in (0, 1):
        untouched = [b for b in range(BLOCKS) if (rank, b) not in written]
        assert not views[rank][1][untouched].any()
    # chunks of two blocks: five blocks go in three messages, three in two
    assert transports[0].messages == 3
    assert transports[1].messages == 2
    # the host time by part: the ids' one copy, then the first round posted before the
    # local copies are queued, then the writes
    for clock in clocks.values():
        assert list(clock.phases) == ["ids", "gather", "post", "local", "write"]


def test_a_chunk_bound_for_a_run_of_whole_blocks_is_received_in_place(monkeypatch) -> None:
    """Rank 1 receives its slice (every layer of its blocks 7-11, one ascending run) straight
    into its view, with no scratch and no write; rank 0's (blocks 0, 2, 4) still goes
    through a buffer and a write."""
    written: list[tuple[int, int]] = []
    write = kv_exchange._write

    def counting_write(c, lo, hi, data, view, ids=None):
        written.append((c.src_rank, c.dst_rank))
        write(c, lo, hi, data, view, ids)

    monkeypatch.setattr(kv_exchange, "_write", counting_write)
    views = {rank: _views(rank) for rank in (0, 1)}
    links: dict = {}
    remote = [c for c in PLAN if c.src_rank != c.dst_rank]
    chunk = 3 * 2 * 2 * BS * H * D * 4  # three blocks of two layers, float32

    def run(rank: int) -> None:
        src, dst = views[rank]
        kv_exchange.move(remote, rank, src, dst, LoopbackTransport(rank, links, 8), chunk)

    threads = [threading.Thread(target=run, args=(rank,)) for rank in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert written == [(1, 0)]  # rank 1's chunks (7-9, 10-11) in place; rank 0's (0, 2, 4) not
    for c in remote:
        (a, b), (x, y) = c.src_layers, c.dst_layers
        for s, d in zip(c.src_blocks, c.dst_blocks, strict=True):
            assert torch.equal(views[c.dst_rank][1][d, x:y], views[c.src_rank][0][s, a:b])
    # in place means the run exactly: rank 1's blocks 0-6 are untouched
    assert not views[1][1][:7].any()
    # a run of whole blocks, but of some layers only, goes through a buffer
    _, dst = views[0]
    partial = SliceCopy(1, 0, (0, 1), (0, 1), (0, 1), (5, 6))
    _, in_place = kv_exchange._receive_buffer(partial, 0, 2, dst)
    assert not in_place


def test_move_of_local_slices_only_needs_no_transport() -> None:
    src, dst = _views(3)
    local = [c for c in PLAN if c.src_rank == c.dst_rank == 0]
    assert kv_exchange.move(local, 0, src, dst, None, chunk_bytes=1) == 1
    (a, b), (x, y) = local[0].src_layers, local[0].dst_layers
    for s, d in zip(local[0].src_blocks, local[0].dst_blocks, strict=True):
        assert torch.equal(dst[d, x:y], src[s, a:b])
    written = set(local[0].dst_blocks)
    assert not dst[[i for i in range(BLOCKS) if i not in written]].any()


def test_move_across_workers_needs_a_transport() -> None:
    src, dst = _views(0)
    with pytest.raises(RuntimeError, match="no transport"):
        kv_exchange.move(PLAN[:1], 0, src, dst, None)


def _gloo_move(rank: int, init: str, out: str) -> None:
    import torch.distributed as dist

    from attention.transport import StageTransport

    dist.init_process_group("gloo", init_method=init, world_size=2, rank=rank)
    try:
        src, dst = _views(rank)
        transport = StageTransport(torch.device("cpu"), 8, torch.float32)
        block_bytes = 2 * 2 * BS * H * D * 4
        # one block a chunk: rank 0 posts its five rounds to rank 1 two at a time
        kv_exchange.move(PLAN, rank, src, dst, transport, block_bytes)
        torch.save(dst, f"{out}/dst{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_move_over_gloo_with_rounds_in_flight(tmp_path) -> None:
    """The same plan on two real gloo processes (``StageTransport.post_exchange``): each
    round is posted before the previous one is written, and every slice still lands where
    the plan says."""
    import torch.multiprocessing as mp

    from tests.server_harness import free_port

    init = f"tcp://127.0.0.1:{free_port()}"
    mp.spawn(_gloo_move, args=(init, str(tmp_path)), nprocs=2, join=True)
    dst = {rank: torch.load(tmp_path / f"dst{rank}.pt") for rank in (0, 1)}
    for c in PLAN:
        src, _ = _views(c.src_rank)
        (a, b), (x, y) = c.src_layers, c.dst_layers
        for s, d in zip(c.src_blocks, c.dst_blocks, strict=True):
            assert torch.equal(dst[c.dst_rank][d, x:y], src[s, a:b]), (c, s, d)
    written = {(c.dst_rank, d) for c in PLAN for d in c.dst_blocks}
    for rank in (0, 1):
        untouched = [b for b in range(BLOCKS) if (rank, b) not in written]
        assert not dst[rank][untouched].any()


def test_every_chunks_ids_start_16_bytes_aligned() -> None:
    """Triton specializes on 16-byte pointer alignment: unaligned ids would compile the
    block copy anew while serving."""
    chunks = [(c, lo, min(lo + 1, len(c.src_blocks))) for c in PLAN for lo in (0, 1, 2)]
    chunks = [x for x in chunks if x[1] < len(x[0].src_blocks)]
    ids = kv_exchange._ChunkIds(0, chunks, {}, torch.device("cpu"))
    views = [ids.src(c, lo) for c, lo, _ in chunks] + [ids.dst(c, lo) for c, lo, _ in chunks]
    assert all(v.data_ptr() % 16 == 0 for v in views)
    assert [ids.src(c, lo).tolist() for c, lo, hi in chunks] == [
        list(c.src_blocks[lo:hi]) for c, lo, hi in chunks
    ]
    assert [ids.dst(c, lo).tolist() for c, lo, hi in chunks] == [
        list(c.dst_blocks[lo:hi]) for c, lo, hi in chunks
    ]
