"""Where a drop's first live KV exchange spends its time, on 2 GPUs (diagnostic, not a bench).

The drop bench's first pipelined step moves every pre-drop request's KV (workers/
kv_exchange.move): each worker's requests send the other stage's layers over the link and
copy their own stage's layers locally, in chunks. Device-synced, that took 8.7 ms for
about 0.55 GiB each way (session 8), far below the link's ~370 GB/s. This times, on the bench's
shapes (Llama-3-8B KV, 16-token blocks, 4 GiB of KV per GPU, 8 requests of 69 blocks per
worker):

- ``move``'s first call in the process (what a server's first drop pays), then warm calls;
- ``move`` with its default chunk (``MOVE_CHUNK_BYTES``) and other chunk sizes, and the host
  time it takes to issue (to its return);
- ``move`` with destination blocks in no run (every chunk through scratch and a write, as
  before chunks were received in place);
- the local copies alone, and the remote ones alone;
- one NCCL batch of the same bytes between contiguous buffers (the link floor of the plan).

Usage (repo root, 2 GPUs): ``python3 tools/device/exchange_probe.py OUT.json``.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from attention.transport import StageTransport, batch_exchange, connect_all_pairs
from workers import kv_exchange
from workers.kv_exchange import SliceCopy

L, BS, H, D = 32, 16, 8, 128
CUDA = torch.cuda.is_available()  # without it: a small gloo run that checks the script
LEGACY_BLOCKS = 2048 if CUDA else 64  # L-layer blocks of 2 MiB: 4 GiB per GPU
HELD = 8 * 69 if CUDA else 20  # 8 requests of ~1,100 tokens per worker
DST = 2400 if CUDA else 48
REPEATS = 5


def _plan(in_a_row: bool = True) -> list[SliceCopy]:
    """The first step of a drop of 2 stages (layers [0, 16) and [16, 32)): each worker's
    legacy blocks 0..HELD-1 move, layer by layer range, into stage-view blocks from DST up
    (past the legacy blocks' aliases, ids 0..2*HELD-1). ``in_a_row=False``: the destination
    blocks in pairs swapped (no run of more than one block: every chunk through scratch)."""
    src = tuple(range(HELD))
    dst = tuple(range(DST, DST + HELD))
    if not in_a_row:
        dst = tuple(b ^ 1 for b in dst)
    half = L // 2
    return [
        SliceCopy(0, 0, (0, half), (0, half), src, dst),
        SliceCopy(0, 1, (half, L), (0, half), src, dst),
        SliceCopy(1, 0, (0, half), (0, half), src, dst),
        SliceCopy(1, 1, (half, L), (0, half), src, dst),
    ]


def _timed(fn, device, host: bool = False) -> float:
    """Milliseconds of ``fn`` to the device's end (``host``: until it returns), the slower
    worker's."""
    dist.barrier()
    sync = torch.cuda.synchronize if CUDA else (lambda d: None)
    sync(device)
    start = time.perf_counter()
    fn()
    ms = 1e3 * (time.perf_counter() - start)
    sync(device)
    if not host:
        ms = 1e3 * (time.perf_counter() - start)
    t = torch.tensor([ms], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _worker(rank: int, tmp: str, out: str) -> None:
    device = torch.device("cuda", rank) if CUDA else torch.device("cpu")
    if CUDA:
        torch.cuda.set_device(device)
    backend = "nccl" if CUDA else "gloo"
    dist.init_process_group(backend, init_method=f"file://{tmp}/init", rank=rank, world_size=2)
    connect_all_pairs(rank, 2, device)
    base = torch.randn(LEGACY_BLOCKS * L * 2 * BS * H * D, dtype=torch.bfloat16, device=device)
    legacy = base.view(LEGACY_BLOCKS, L, 2, BS, H, D)
    stage = base.view(LEGACY_BLOCKS * 2, L // 2, 2, BS, H, D)
    transport = StageTransport(device, 4096, torch.bfloat16)
    plan = _plan()
    me = rank
    remote = [c for c in plan if c.src_rank != c.dst_rank]
    local = [c for c in plan if c.src_rank == c.dst_rank]
    moved = sum(len(c.src_blocks) * legacy[0, : c.num_layers].numel() * 2 for c in remote) // 2

    def move(p, chunk=kv_exchange.MOVE_CHUNK_BYTES):
        return lambda: kv_exchange.move(p, me, legacy, stage, transport, chunk)

    result: dict = {"bytes_each_way": moved}
    result["move_cold_ms"] = _timed(move(plan), device)
    scattered = _plan(in_a_row=False)
    for name, p, chunk in (
        ("move", plan, kv_exchange.MOVE_CHUNK_BYTES),
        ("move_256MiB", plan, 256 << 20),
        ("move_scattered_dst", scattered, kv_exchange.MOVE_CHUNK_BYTES),
    ):  # host time to issue: what a drop's first step waits before its compute launches
        runs = [_timed(move(p, chunk), device, host=True) for _ in range(REPEATS)]
        result[name + "_host_ms"] = statistics.median(runs)
    variants = {
        "move": move(plan),
        "move_scattered_dst": move(scattered),
        "move_64MiB": move(plan, 64 << 20),
        "move_256MiB": move(plan, 256 << 20),
        "move_512MiB": move(plan, 512 << 20),
        "move_1GiB": move(plan, 1 << 30),
        "local_only": move(local),
        "remote_only": move(remote),
    }
    send = torch.empty(moved // 2, dtype=torch.bfloat16, device=device)
    recv = torch.empty_like(send)
    variants["nccl_batch_contiguous"] = lambda: batch_exchange([(1 - me, send)], [(1 - me, recv)])
    variants["nccl_one_way"] = lambda: dist.send(send, 1) if me == 0 else dist.recv(recv, 0)
    for name, fn in variants.items():
        runs = [_timed(fn, device) for _ in range(REPEATS)]
        result[name + "_ms"] = statistics.median(runs)
        result[name + "_runs_ms"] = runs
    gbps = moved / 1e6
    for name in ("move", "remote_only", "nccl_batch_contiguous", "nccl_one_way"):
        result[name + "_GBps_each_way"] = gbps / result[name + "_ms"]
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
        print(json.dumps({k: v for k, v in result.items() if not k.endswith("_runs_ms")}, indent=1))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    out = sys.argv[1] if len(sys.argv) > 1 else "exchange_probe.json"
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(tmp, out), nprocs=2)


if __name__ == "__main__":
    main()
