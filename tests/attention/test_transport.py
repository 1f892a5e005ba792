"""The transport's start-up pair check on real gloo processes."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from attention.transport import connect_all_pairs
from tests.server_harness import free_port


def _main(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, world_size=world, rank=rank)
    try:
        connect_all_pairs(rank, world, torch.device("cpu"))
        # The pairs are open: a ring of sends and receives after it still matches in order.
        got = torch.empty(1, dtype=torch.int64)
        req = dist.isend(torch.tensor([rank * 10]), (rank + 1) % world)
        dist.recv(got, (rank - 1) % world)
        req.wait()
        Path(out, f"rank{rank}").write_text(str(int(got.item())))
    finally:
        dist.destroy_process_group()


def test_connect_all_pairs_on_four_gloo_ranks(tmp_path: Path) -> None:
    world = 4
    mp.spawn(_main, args=(world, f"tcp://127.0.0.1:{free_port()}", str(tmp_path)), nprocs=world)
    got = [int((tmp_path / f"rank{r}").read_text()) for r in range(world)]
    assert got == [((r - 1) % world) * 10 for r in range(world)]


@pytest.mark.gpu
def test_step_header_and_plan_reach_the_gpu_without_waiting_for_the_stream() -> None:
    """The leader builds a header (and a plan) per launch while the GPU still computes the
    micro-batch before: building them must not wait for that work (``torch.tensor(list,
    device=cuda)`` did, a stream sync per launch). Measured against a 0.2 s GPU sleep queued
    first; the tensors still hold the right values once the stream reaches them."""
    from attention.transport import StageOp, StepHeader
    from workers.remote_attention import StepPlan

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    device = torch.device("cuda", 0)
    torch.cuda.synchronize(device)
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(50_000_000)  # a busy stream
    end.record()
    end.synchronize()
    cycles_per_ms = 50_000_000 / start.elapsed_time(end)
    torch.cuda._sleep(int(200 * cycles_per_ms))  # about 0.2 s of queued GPU work
    t0 = time.perf_counter()
    header = StepHeader(StageOp.STEP, 5, 2, 3, 2, 4, 9, 0).encode(device)
    plan = StepPlan(()).encode(device)
    host_s = time.perf_counter() - t0
    assert host_s < 0.05, f"encoding waited {host_s * 1e3:.0f} ms for the stream"
    assert StepHeader.decode(header) == StepHeader(StageOp.STEP, 5, 2, 3, 2, 4, 9, 0)
    assert StepPlan.decode(plan) == StepPlan(())


def test_a_micro_batch_body_packs_its_metadata_into_one_buffer() -> None:
    """pack_meta and unpack_meta round-trip every field of a micro-batch, each in its wire
    dtype (an int64 query_start_loc arrives int32), as views of one buffer of the header's
    size; a buffer of another size is refused with both sizes named."""
    from attention.metadata import AttentionMetadata
    from attention.transport import StageInputs, meta_bytes, pack_meta, unpack_meta

    meta = AttentionMetadata(
        slot_mapping=torch.tensor([5, 6, 7, 40, 41], dtype=torch.int64),
        block_tables=torch.tensor([[0, 1, 0], [2, 3, 4]], dtype=torch.int32),
        seq_lens=torch.tensor([3, 42], dtype=torch.int32),
        query_start_loc=torch.tensor([0, 3, 5], dtype=torch.int64),
        max_query_len=3,
        max_seq_len=42,
    )
    x = StageInputs(None, None, torch.tensor([0, 1, 2, 40, 41]), meta, torch.tensor([2, 4]))
    h = x.header()
    packed = pack_meta(x)
    assert (
        packed.dtype == torch.uint8
        and packed.numel() == meta_bytes(h) == 5 * 8 * 2 + 2 * 8 + (6 + 2 + 3) * 4
    )
    fields = unpack_meta(packed, h)
    expected = [x.positions, meta.slot_mapping, x.logits_indices, meta.block_tables, meta.seq_lens]
    expected.append(meta.query_start_loc.int())
    for got, want in zip(fields, expected, strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)
        assert got.untyped_storage().data_ptr() == packed.untyped_storage().data_ptr()
    with pytest.raises(ValueError, match="packed metadata has 4 bytes, the header says 140"):
        unpack_meta(torch.zeros(4, dtype=torch.uint8), h)
