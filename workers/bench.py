"""``kunserve bench engine``: decode step time of one engine, beside the HBM floor.

The floor is the bytes a decode step must read (all weights plus every request's KV) over the
copy bandwidth measured in the same run (a device-to-device copy, bytes read plus written).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass

import torch

from workers.config import EngineConfig
from workers.engine import Engine, RequestSpec
from workers.request import SamplingParams


@dataclass
class DecodeResult:
    batch: int
    context: int
    step_ms: float
    tokens_per_s: float
    floor_ms: float
    mean_running: float  # requests actually decoding per timed step
    preemptions: int  # during the whole point (prefill included)

    @property
    def vs_floor(self) -> float:
        return self.step_ms / self.floor_ms if self.floor_ms else float("nan")


def copy_bandwidth(device: torch.device, nbytes: int = 2 << 30) -> float:
    """Bytes/s of a large device-to-device copy, counting bytes read and written."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    _sync(device)
    t0 = time.perf_counter()
    iters = 10
    for _ in range(iters):
        dst.copy_(src)
    _sync(device)
    return 2 * src.numel() * src.element_size() * iters / (time.perf_counter() - t0)


def bench_decode(
    engine: Engine, batch: int, context: int, steps: int, bandwidth: float
) -> DecodeResult:
    """Fills ``batch`` requests with ``context`` prompt tokens, then times ``steps`` decode steps."""
    vocab = engine.runner.model_config.vocab_size
    gen = torch.Generator().manual_seed(batch * 7919 + context)
    sampling = SamplingParams(temperature=0.0, ignore_eos=True)
    ids = [f"bench-{batch}-{context}-{i}" for i in range(batch)]
    # Requests whose prompt finished early decode while the others prefill: leave them room,
    # so every request is still decoding through the timed steps.
    max_new = decode_tokens_needed(engine, batch, context, steps)
    preempted_before = engine.scheduler.num_preemptions
    for rid in ids:
        prompt = torch.randint(0, vocab, (context,), generator=gen).tolist()
        engine.add_request(RequestSpec(rid, prompt, sampling, max_tokens=max_new))
    while any(
        r.num_computed_tokens < r.num_prompt_tokens
        for r in (*engine.scheduler.running, *engine.scheduler.waiting)
    ):
        engine.step()
    for _ in range(2):
        engine.step()  # warm-up decode steps
    _sync(engine.runner.device)
    t0 = time.perf_counter()
    running = 0
    for _ in range(steps):
        running += len(engine.scheduler.running)
        engine.step()
    _sync(engine.runner.device)
    elapsed = time.perf_counter() - t0
    preemptions = engine.scheduler.num_preemptions - preempted_before
    for rid in ids:
        engine.abort(rid)
    runner = engine.runner
    weight_bytes = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    kv_bytes = batch * (context + 4) * runner.block_bytes // runner.block_size
    floor_ms = 1e3 * (weight_bytes + kv_bytes) / bandwidth if bandwidth else 0.0
    step_ms = 1e3 * elapsed / steps
    return DecodeResult(
        batch, context, step_ms, running / elapsed, floor_ms, running / steps, preemptions
    )


def decode_tokens_needed(engine: Engine, batch: int, context: int, steps: int) -> int:
    """Tokens a request may generate before the timed steps end: the prefill steps of the whole
    batch (budget-bound) plus warm-up and timed steps, with slack."""
    prefill_steps = -(-batch * context // engine.config.scheduler.max_num_batched_tokens)
    return prefill_steps + steps + 8


def run_engine_bench(
    config: EngineConfig,
    batches: list[int],
    contexts: list[int],
    steps: int = 32,
    out_json: str | None = None,
) -> list[DecodeResult]:
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    engine = Engine(config, device)
    bandwidth = copy_bandwidth(device) if device.type == "cuda" else 0.0
    results = []
    print(
        f"device {device}; copy bandwidth {bandwidth / 1e12:.2f} TB/s; "
        f"KV blocks {engine.pool.num_blocks}"
    )
    print(
        f"{'batch':>6} {'ctx':>6} {'step ms':>9} {'tok/s':>10} {'floor ms':>9} {'x floor':>8} "
        f"{'running':>8} {'preempt':>8}"
    )
    for ctx in contexts:
        for b in batches:
            need = b * engine.kv.blocks_needed(ctx + decode_tokens_needed(engine, b, ctx, steps))
            if need > engine.pool.num_blocks:
                print(f"{b:>6} {ctx:>6}   skipped: needs {need} KV blocks")
                continue
            r = bench_decode(engine, b, ctx, steps, bandwidth)
            results.append(r)
            print(
                f"{b:>6} {ctx:>6} {r.step_ms:>9.2f} {r.tokens_per_s:>10.1f} "
                f"{r.floor_ms:>9.2f} {r.vs_floor:>8.2f} {r.mean_running:>8.1f} {r.preemptions:>8}"
            )
    if out_json:
        with open(out_json, "w") as f:
            json.dump(
                {
                    "bandwidth_Bps": bandwidth,
                    "device": str(device),
                    "results": [asdict(r) | {"vs_floor": r.vs_floor} for r in results],
                },
                f,
                indent=2,
            )
    return results


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
