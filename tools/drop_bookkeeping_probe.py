"""Host time of a drop's request bookkeeping at full KV (CPU only, no model).

The leader adopts every running request as a pre-drop request while the engines are parked
(``GroupKVManager.adopt_all``: their L-layer blocks reserved in the group pool), and its first
pipelined step plans the live exchange for all of them (``plan_exchange``: a pipeline block
for each block held, the reservations freed). Both are Python over every block the requests
hold, so they grow with the KV cache: a drop happens when it is full.

Usage: python tools/drop_bookkeeping_probe.py [--requests 256] [--blocks 400] [--pool 300000]

Prints each step's host time (best of --repeats), with the block pool's long id lists taken
id by id (``BULK_IDS`` out of reach) as the baseline, in the same process.
"""

from __future__ import annotations

import argparse
import time

from workers import block_pool
from workers.block_pool import BlockPool
from workers.remote_attention import GroupKVManager, GroupLayout
from workers.request import Request, RequestStatus, SamplingParams
from workers.scheduler import ScheduledRequest, SchedulerOutput

LAYOUT = GroupLayout((0, 1), ((0, 16), (16, 32)))
"""Llama-3-8B's 32 layers over two stages."""
LAYER_BLOCK_BYTES = 16 * 8 * 128 * 2 * 2
"""One layer of one 16-token block, K and V, 8 KV heads of 128, bf16."""


def one_drop(requests: int, blocks: int, pool: int) -> tuple[float, float]:
    """(adopt_all, plan_exchange) host seconds for ``requests`` running requests of
    ``blocks`` L-layer blocks each, alternately homed on the two workers."""
    kv = GroupKVManager(BlockPool(pool), 16, LAYOUT, LAYER_BLOCK_BYTES, 1 << 50)
    running = []
    for i in range(requests):
        r = Request(f"r{i}", [0] * 16, SamplingParams(temperature=0.0), 8, frozenset())
        r.status, r.num_computed_tokens = RequestStatus.RUNNING, blocks * 16 - 8
        r.block_ids = list(range((i // 2) * blocks, (i // 2 + 1) * blocks))
        running.append((r, i % 2))
    out = SchedulerOutput(scheduled=[ScheduledRequest(r, 1) for r, _ in running])
    t0 = time.perf_counter()
    kv.adopt_all(running)
    t1 = time.perf_counter()
    kv.plan_exchange(out)
    return t1 - t0, time.perf_counter() - t1


def best(requests: int, blocks: int, pool: int, repeats: int) -> tuple[float, float]:
    runs = [one_drop(requests, blocks, pool) for _ in range(repeats)]
    return min(a for a, _ in runs), min(p for _, p in runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--blocks", type=int, default=400, help="L-layer blocks per request")
    ap.add_argument("--pool", type=int, default=300_000, help="group pool blocks")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    shape = (args.requests, args.blocks, args.pool)
    adopt, plan = best(*shape, args.repeats)
    bulk = getattr(block_pool, "BULK_IDS", None)  # None: a tree from before it
    block_pool.BULK_IDS = 1 << 62  # the baseline: long id lists taken id by id
    try:
        adopt0, plan0 = best(*shape, args.repeats)
    finally:
        block_pool.BULK_IDS = bulk
    print(f"{args.requests} requests x {args.blocks} blocks, group pool of {args.pool}:")
    print(f"  adopt_all      {1e3 * adopt:7.1f} ms  (id by id: {1e3 * adopt0:.1f} ms)")
    print(f"  plan_exchange  {1e3 * plan:7.1f} ms  (id by id: {1e3 * plan0:.1f} ms)")


if __name__ == "__main__":
    main()
