"""`kunserve bench drop`: a forced drop and restore under live decode, measured from a client.

Against a running server with at least two instances and ``--overload-policy drop``: start
``--num-requests`` requests (random prompt token ids, ``ignore_eos``) and let them decode, then
``admin drop``, then ``admin restore``, recording every token's arrival time. Prints, each beside
its baseline from the same run (DESIGN.md §8, issue #5):

- drop time (the server's own transition time) beside the target; the restore's pause (how
  long the split parked the workers, after the live gather of KV) beside the link floor
  ``weight bytes dropped per stage / --link-gbps``, and the whole restore with its gather;
- KV capacity after / before beside the bound ``1 + ((g-1)/g)·W/K`` (W: weight bytes per GPU,
  K: KV bytes per GPU before the drop);
- the largest gap between two tokens of a request that was running at the drop, across the
  drop and across the restore, beside that request's median time between tokens before it;
- decode tokens/s in pipeline mode beside normal mode (same requests, same concurrency);
- prompt tokens/s of a burst of ``--prefill-requests`` prompts (``--prefill-len`` tokens each,
  one output token) sent at once beside the decoding requests, in pipeline mode beside normal
  mode: a burst is prefill, and a pipeline runs it in micro-batches (DESIGN.md §6).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import grpc

from client.api_types import Finished
from client.grpc_client import AsyncKunserveClient
from proto.kunserve.v1 import admin_pb2 as apb
from proto.kunserve.v1 import admin_pb2_grpc as apb_grpc


@dataclass
class _Trace:
    times: list[float] = field(default_factory=list)
    """Arrival time of each token (monotonic seconds; a delta of k tokens counts k times)."""
    finished: Finished | None = None
    """The stream's last event, once it ended."""


async def _run_request(
    client: AsyncKunserveClient, rid: str, prompt: list[int], n: int, tr: _Trace
):
    stream = client.generate(
        prompt, request_id=rid, max_tokens=n, temperature=0.0, ignore_eos=True, detokenize=False
    )
    async for ev in stream:
        if isinstance(ev, Finished):
            tr.finished = ev
            continue
        now = time.monotonic()
        tr.times.extend([now] * len(ev.token_ids))


async def _prefill_burst(
    client: AsyncKunserveClient, vocab: int, n: int, length: int, tag: str
) -> float:
    """Sends ``n`` prompts of ``length`` random tokens at once, one output token each; returns
    prompt tokens/s: ``n * length`` over the seconds until the last one has finished (0 when
    ``n`` is 0). Raises what a request raised."""
    if n == 0:
        return 0.0
    rng = random.Random(tag)
    prompts = [[rng.randrange(1, vocab) for _ in range(length)] for _ in range(n)]
    start = time.monotonic()
    await asyncio.gather(
        *(
            _run_request(client, f"bench-prefill-{tag}-{i}", p, 1, _Trace())
            for i, p in enumerate(prompts)
        )
    )
    return n * length / (time.monotonic() - start)


def _finished_early(i: int, trace: _Trace, args: argparse.Namespace) -> str:
    """Why the bench cannot measure: request ``i`` ended before every request had decoded
    two tokens (before the drop)."""
    fin = trace.finished
    reason = "no final event" if fin is None else f"reason {fin.reason!r}"
    head = f"request bench-drop-{i} ended before the drop ({reason}, {len(trace.times)} tokens)"
    if fin is not None and fin.reason == "length" and len(trace.times) >= args.max_tokens:
        return f"{head}: raise --max-tokens"
    return (
        f"{head}: the server ended it short of --max-tokens {args.max_tokens}; check that its "
        f"KV cache and max model length hold {args.num_requests} requests of "
        f"{args.prompt_len} + {args.max_tokens} tokens"
    )


def _max_gap(times: list[float], lo: float, hi: float) -> float:
    """Largest gap between consecutive tokens with the later one in [lo, hi]."""
    gaps = [b - a for a, b in zip(times, times[1:], strict=False) if lo <= b <= hi]
    return max(gaps, default=0.0)


def _tbt(times: list[float], lo: float, hi: float) -> float:
    gaps = [b - a for a, b in zip(times, times[1:], strict=False) if lo <= a and b <= hi and b > a]
    return statistics.median(gaps) if gaps else float("nan")


def _rate(traces: list[_Trace], lo: float, hi: float) -> float:
    n = sum(1 for t in traces for x in t.times if lo <= x <= hi)
    return n / max(hi - lo, 1e-9)


async def _idle_server_info(client: AsyncKunserveClient, timeout_s: float) -> Any:
    """The server's info once no instance runs or queues a request (a previous run's cancelled
    requests are still being released); raises SystemExit naming what is left after
    ``timeout_s`` (a request the server never released)."""
    deadline = time.monotonic() + timeout_s
    while True:
        info = await client.server_info()
        busy = {i.instance_id: (i.num_running, i.num_waiting) for i in info.instances}
        if not any(r or w for r, w in busy.values()):
            return info
        if time.monotonic() > deadline:
            raise SystemExit(
                f"the server still holds requests after {timeout_s:.0f} s "
                f"(instance: (running, waiting)) {busy}: the bench needs an idle server"
            )
        await asyncio.sleep(0.2)


async def run(args: argparse.Namespace) -> dict:
    client = AsyncKunserveClient(args.host, args.port)
    await client.wait_ready(args.ready_timeout)
    info = await _idle_server_info(client, args.idle_timeout_s)
    if info.overload_policy != "drop":
        raise SystemExit(f"the server's overload policy is {info.overload_policy!r}; need drop")
    inst = [i for i in info.instances if i.state == "normal"]
    kv_bytes = sum(i.kv_bytes_total for i in inst)
    vocab = (await client.model_info()).vocab_size
    rng = random.Random(0)
    traces = [_Trace() for _ in range(args.num_requests)]
    tasks = [
        asyncio.ensure_future(
            _run_request(
                client,
                f"bench-drop-{i}",
                [rng.randrange(1, vocab) for _ in range(args.prompt_len)],
                args.max_tokens,
                traces[i],
            )
        )
        for i in range(args.num_requests)
    ]
    while min(len(t.times) for t in traces) < 2:
        done = [i for i, t in enumerate(tasks) if t.done()]
        if done:
            tasks[done[0]].result()  # raises what the request raised
            raise SystemExit(_finished_early(done[0], traces[done[0]], args))
        await asyncio.sleep(0.05)
    t0 = time.monotonic()
    await asyncio.sleep(args.phase_s)
    t_normal_end = time.monotonic()  # the prefill bursts stay out of the decode windows
    burst = (vocab, args.prefill_requests, args.prefill_len)
    normal_prefill = await _prefill_burst(client, *burst, "normal")
    channel = grpc.aio.insecure_channel(f"{args.host}:{args.port}")
    admin = apb_grpc.AdminServiceStub(channel)
    t_drop = time.monotonic()
    dropped = (await admin.Drop(apb.DropRequest(), timeout=300)).group
    t_dropped = time.monotonic()
    await asyncio.sleep(args.phase_s)
    t_pipeline_end = time.monotonic()
    pipeline_prefill = await _prefill_burst(client, *burst, "pipeline")
    t_restore = time.monotonic()
    restored = (await admin.Restore(apb.RestoreRequest(), timeout=300)).group
    t_restored = time.monotonic()
    await asyncio.sleep(args.phase_s)
    t_end = time.monotonic()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await channel.close()
    await client.close()

    g = len(dropped.instance_ids)
    tbt = [_tbt(t.times, t0, t_normal_end) for t in traces]
    drop_gap = [_max_gap(t.times, t_drop, t_dropped + args.phase_s / 2) for t in traces]
    restore_gap = [_max_gap(t.times, t_restore, t_restored + args.phase_s / 2) for t in traces]
    weight_bytes = args.weight_gb * 2**30
    k_per_gpu = kv_bytes / max(1, len(inst))
    bound = 1 + (g - 1) / g * weight_bytes / k_per_gpu
    capacity = dropped.kv_blocks_after / max(1, dropped.kv_blocks_before)
    link_floor = weight_bytes * (g - 1) / g / (args.link_gbps * 1e9)
    settle = min(args.phase_s / 2, 1.0)
    out = {
        "g": g,
        "drop_s": dropped.transition_s,
        "drop_paused_s": dropped.paused_s,
        "drop_client_s": t_dropped - t_drop,
        "restore_s": restored.transition_s,
        "restore_paused_s": restored.paused_s,
        "restore_client_s": t_restored - t_restore,
        "restore_link_floor_s": link_floor,
        "kv_blocks_before": dropped.kv_blocks_before,
        "kv_blocks_after": dropped.kv_blocks_after,
        "capacity_ratio": capacity,
        "capacity_bound": bound,
        "normal_tbt_ms": statistics.median(tbt) * 1e3,
        "max_gap_drop_ms": max(drop_gap) * 1e3,
        "max_gap_drop_x_tbt": max(d / b for d, b in zip(drop_gap, tbt, strict=True)),
        "max_gap_restore_ms": max(restore_gap) * 1e3,
        "max_gap_restore_x_tbt": max(d / b for d, b in zip(restore_gap, tbt, strict=True)),
        "normal_tokens_per_s": _rate(traces, t0, t_normal_end),
        "pipeline_tokens_per_s": _rate(traces, t_dropped + settle, t_pipeline_end),
        "after_restore_tokens_per_s": _rate(traces, t_restored + settle, t_end),
        "normal_prefill_tokens_per_s": normal_prefill,
        "pipeline_prefill_tokens_per_s": pipeline_prefill,
    }
    out["pipeline_vs_normal"] = out["pipeline_tokens_per_s"] / out["normal_tokens_per_s"]
    out["pipeline_vs_normal_prefill"] = pipeline_prefill / normal_prefill if normal_prefill else 0
    return out


def report(r: dict) -> str:
    rows = [
        ("drop (server)", f"{r['drop_s'] * 1e3:.1f} ms", "target <= 50 ms"),
        ("drop pause (server)", f"{r['drop_paused_s'] * 1e3:.1f} ms", "after staging"),
        (
            "restore pause (server)",
            f"{r['restore_paused_s'] * 1e3:.1f} ms",
            f"{r['restore_paused_s'] / r['restore_link_floor_s']:.2f}x link floor "
            f"{r['restore_link_floor_s'] * 1e3:.1f} ms (target <= 2x)",
        ),
        (
            "restore with live gather",
            f"{r['restore_s'] * 1e3:.1f} ms",
            "requests decode meanwhile",
        ),
        (
            "KV capacity after/before",
            f"{r['capacity_ratio']:.2f}x",
            f"bound {r['capacity_bound']:.2f}x ({r['capacity_ratio'] / r['capacity_bound']:.0%})",
        ),
        (
            "max token gap at drop",
            f"{r['max_gap_drop_ms']:.1f} ms",
            f"{r['max_gap_drop_x_tbt']:.2f}x its TBT (normal TBT {r['normal_tbt_ms']:.1f} ms; "
            "target <= 2x)",
        ),
        (
            "max token gap at restore",
            f"{r['max_gap_restore_ms']:.1f} ms",
            f"{r['max_gap_restore_x_tbt']:.2f}x its TBT",
        ),
        (
            "decode tokens/s pipelined",
            f"{r['pipeline_tokens_per_s']:.0f}",
            f"{r['pipeline_vs_normal']:.2f}x normal ({r['normal_tokens_per_s']:.0f})",
        ),
    ]
    if r["normal_prefill_tokens_per_s"]:
        rows.append(
            (
                "prompt tokens/s pipelined",
                f"{r['pipeline_prefill_tokens_per_s']:.0f}",
                f"{r['pipeline_vs_normal_prefill']:.2f}x normal "
                f"({r['normal_prefill_tokens_per_s']:.0f}), a burst beside the decodes",
            )
        )
    width = max(len(a) for a, _, _ in rows)
    return "\n".join(f"{a:<{width}}  {b:>12}  {c}" for a, b, c in rows)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kunserve bench drop", description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--ready-timeout", type=float, default=600.0)
    p.add_argument(
        "--idle-timeout-s",
        type=float,
        default=30.0,
        help="how long to wait for the server to hold no request before starting",
    )
    p.add_argument("--num-requests", type=int, default=32, help="requests decoding at the drop")
    p.add_argument("--prompt-len", type=int, default=1024, help="prompt tokens per request")
    p.add_argument("--max-tokens", type=int, default=100000, help="tokens each may generate")
    p.add_argument("--phase-s", type=float, default=5.0, help="seconds per phase")
    p.add_argument(
        "--prefill-requests",
        type=int,
        default=16,
        help="prompts of each prefill burst (one before the drop, one after; 0: none)",
    )
    p.add_argument("--prefill-len", type=int, default=1024, help="prompt tokens per burst prompt")
    p.add_argument("--weight-gb", type=float, required=True, help="weight GiB per GPU (W)")
    p.add_argument("--link-gbps", type=float, default=395.0, help="link floor, GB/s")
    p.add_argument("--output-json", default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = asyncio.run(run(args))
    print(report(result))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
