"""The transport's start-up pair check on real gloo processes."""

from __future__ import annotations

from pathlib import Path

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
