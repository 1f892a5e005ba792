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
