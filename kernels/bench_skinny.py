"""The skinny GEMM (kernels/skinny_gemm.py) on one CUDA GPU, beside cuBLAS and the HBM floor.

Part of ``kunserve bench kernels`` (``python -m kernels.bench --only skinny`` runs only this).
For Llama-3-8B's projections in bf16 at M = 1, 8 and 16 rows (decode batches):

- ``plain``: ``skinny_linear`` vs ``torch.nn.functional.linear`` (cuBLAS);
- the fused variant where one applies, timed with the work it absorbs: ``rms_norm_linear``
  (with a residual) vs our Triton ``rms_norm`` + ``F.linear`` for qkv and gate_up,
  ``silu_and_mul_linear`` vs ``silu_and_mul`` + ``F.linear`` for down;
- the floor: the weight's bytes over the copy bandwidth measured in the same run.

Each measurement replays a CUDA graph of the call (as the engine's decode step does, so the
Python wrappers' launch cost is not counted) with L2 flushed before each replay, median of
``triton.testing.do_bench``, in microseconds. A second table sweeps a few launch configs of the
plain kernel per shape at M = 1 and 16, so that :func:`~kernels.skinny_gemm.
choose_skinny_config` can be retuned from one run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from kernels.activation import silu_and_mul
from kernels.bench import _fmt, _ratio, _time_us, _try
from kernels.norm import rms_norm
from kernels.skinny_gemm import (
    SkinnyConfig,
    choose_skinny_config,
    rms_norm_linear,
    silu_and_mul_linear,
    skinny_linear,
)

DTYPE = torch.bfloat16
ROWS = (1, 8, 16)
PROJECTIONS = (  # Llama-3-8B: (name, in_features K, out_features N, fused prologue)
    ("qkv_proj", 4096, 6144, "rms_norm"),
    ("o_proj", 4096, 4096, None),
    ("gate_up_proj", 4096, 2 * 14336, "rms_norm"),
    ("down_proj", 14336, 4096, "silu_mul"),
)
EPS = 1e-5


def sweep_configs(m: int) -> list[SkinnyConfig]:
    """Launch configs the sweep tries at ``m`` rows (the default is timed in the main table)."""
    if m == 1:
        cuda_cores = [
            SkinnyConfig(1, bn, 8192 // bn, warps, 1) for bn in (16, 32, 64) for warps in (4, 8)
        ]
        return [*cuda_cores, SkinnyConfig(16, 16, 128, 4, 4), SkinnyConfig(16, 64, 64, 4, 4)]
    return [
        SkinnyConfig(16, bn, bk, 4, stages)
        for bn, bk in ((16, 128), (32, 64), (64, 64), (16, 256))
        for stages in (3, 5)
    ]


def _time_graph_flushed_us(fn: Callable[[], Any]) -> float:
    """Median time of one replay of a CUDA graph of ``fn``, L2 flushed before each replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return _time_us(graph.replay)


def _inputs(m: int, k: int, n: int, prologue: str | None, device: torch.device) -> dict:
    """Random bf16 inputs of one projection at ``m`` rows (weights scaled by k^-0.5)."""
    gen = torch.Generator(device=device).manual_seed(m * 7 + n)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device, dtype=DTYPE)

    k_in = 2 * k if prologue == "silu_mul" else k
    return {
        "x": randn(m, k_in),
        "residual": randn(m, k),
        "norm_weight": randn(k).abs() + 0.5,
        "weight": randn(n, k) * k**-0.5,
    }


def _row(
    name: str, m: int, variant: str, ours: Callable, baseline: Callable, floor_us: float
) -> dict:
    errors: list[str] = []
    row = {
        "projection": name,
        "rows": m,
        "variant": variant,
        "ours_us": _try(lambda: _time_graph_flushed_us(ours), errors, "ours"),
        "baseline_us": _try(lambda: _time_graph_flushed_us(baseline), errors, "baseline"),
        "floor_us": floor_us,
        "errors": errors,
    }
    row["ours_over_baseline"] = _ratio(row["ours_us"], row["baseline_us"])
    row["ours_over_floor"] = _ratio(row["ours_us"], floor_us)
    return row


def bench_skinny(bandwidth: float, device: torch.device) -> list[dict]:
    """One row per projection, row count and variant (plain, then the fused one if any).

    Row keys: ``projection``, ``rows``, ``variant`` (plain, rms_norm+residual, silu_mul),
    ``config`` (the default launch config), times ``ours_us``, ``baseline_us`` (cuBLAS plus the
    small kernels the variant absorbs), ``floor_us`` (None where a measurement failed, with the
    reason in ``errors``), and the ratios ``ours_over_baseline``, ``ours_over_floor``.
    """
    rows = []
    for name, k, n, prologue in PROJECTIONS:
        for m in ROWS:
            rows.extend(_projection_rows(name, m, k, n, prologue, bandwidth, device))
            torch.cuda.empty_cache()
    return rows


def _projection_rows(
    name: str,
    m: int,
    k: int,
    n: int,
    prologue: str | None,
    bandwidth: float,
    device: torch.device,
) -> list[dict]:
    t = _inputs(m, k, n, prologue, device)
    x, res, nw, w = t["x"], t["residual"], t["norm_weight"], t["weight"]
    plain_x = x[:, :k].contiguous()
    cases = [("plain", lambda: skinny_linear(plain_x, w), lambda: F.linear(plain_x, w))]
    if prologue == "rms_norm":
        cases.append((
            "rms_norm+residual",
            lambda: rms_norm_linear(x, nw, EPS, w, res),
            lambda: F.linear(rms_norm(x, nw, EPS, res)[0], w),
        ))  # fmt: skip
    elif prologue == "silu_mul":
        cases.append((
            "silu_mul",
            lambda: silu_and_mul_linear(x, w),
            lambda: F.linear(silu_and_mul(x), w),
        ))  # fmt: skip
    floor_us = n * k * DTYPE.itemsize / bandwidth * 1e6
    config = _config_name(choose_skinny_config(m, n, k, _sms(device)))
    return [
        {**_row(name, m, variant, ours, baseline, floor_us), "config": config}
        for variant, ours, baseline in cases
    ]


def sweep_skinny(bandwidth: float, device: torch.device) -> list[dict]:
    """The plain kernel under each of :func:`sweep_configs` per projection at 1 and 16 rows:
    rows of ``projection``, ``rows``, ``config``, ``us``, ``over_floor``, ``errors``."""
    out = []
    for name, k, n, _ in PROJECTIONS:
        for m in (1, 16):
            out.extend(_sweep_shape(name, m, k, n, bandwidth, device))
            torch.cuda.empty_cache()
    return out


def _sweep_shape(
    name: str, m: int, k: int, n: int, bandwidth: float, device: torch.device
) -> list[dict]:
    t = _inputs(m, k, n, None, device)
    x, w = t["x"], t["weight"]
    floor_us = n * k * DTYPE.itemsize / bandwidth * 1e6
    out = []
    for cfg in sweep_configs(m):
        errors: list[str] = []
        us = _try(
            lambda cfg=cfg: _time_graph_flushed_us(lambda: skinny_linear(x, w, config=cfg)),
            errors,
            _config_name(cfg),
        )
        out.append({
            "projection": name, "rows": m, "config": _config_name(cfg), "us": us,
            "over_floor": _ratio(us, floor_us), "errors": errors,
        })  # fmt: skip
    return out


def _config_name(cfg: SkinnyConfig) -> str:
    return f"m{cfg.block_m} n{cfg.block_n} k{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages}"


def _sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def print_skinny(rows: list[dict], sweep: list[dict]) -> None:
    """Prints the two tables: times in microseconds, ratios vs cuBLAS(+kernels) and floor."""
    head = ["projection", "M", "variant", "ours", "cuBLAS(+k)", "floor", "ours/cuBLAS",
            "ours/floor", "config"]  # fmt: skip
    widths = [13, 3, 18, 8, 11, 8, 12, 11, 22]
    print("skinny GEMM (bf16, Llama-3-8B projections; cuBLAS(+k): F.linear plus the Triton "
          "rms_norm / silu_and_mul the variant fuses)")  # fmt: skip
    print(" ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
    for r in rows:
        cells = [
            r["projection"], r["rows"], r["variant"], _fmt(r["ours_us"]), _fmt(r["baseline_us"]),
            _fmt(r["floor_us"]), _fmt(r["ours_over_baseline"], 2), _fmt(r["ours_over_floor"], 2),
            r.get("config", ""),
        ]  # fmt: skip
        print(" ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)))
        for err in r["errors"]:
            print(f"    ! {err}")
    print("skinny GEMM launch configs (plain kernel; m: block_m, n: block_n, k: block_k, "
          "w: warps, s: stages): µs and x floor")  # fmt: skip
    for r in sweep:
        print(
            f"{r['projection']:<13} {r['rows']:<3} {r['config']:<22} {_fmt(r['us']):>8} "
            f"{_fmt(r['over_floor'], 2):>6}"
        )
        for err in r["errors"]:
            print(f"    ! {err}")
