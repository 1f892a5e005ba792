"""Kernel benchmark on one CUDA GPU: the Triton kernels against torch baselines and the HBM floor.

One call runs everything and writes JSON::

    python -c "from kernels.bench import run_kernel_bench; run_kernel_bench('out/kernels.json')"

``python -m kernels.bench --only skinny`` runs only the skinny GEMM tables
(kernels/bench_skinny.py: decode-batch projections vs cuBLAS and the floor); ``--only mixed``
only the mixed-step attention points (decodes split off to the decode kernel vs one prefill
kernel for the whole step); ``--only chunks`` a 1,024-token prefill chunk ending at 1k-7k
tokens of context, through the prefill kernel at several tile configurations vs SDPA flash
(:func:`bench_chunk_attention`).

Decode attention (GQA 32/8, head_dim 128, bf16, block 16; batch x context grid) is timed beside
(a) SDPA's flash backend on the same K/V laid out contiguously, (b) FlexAttention (compiled) on
contiguous K/V, (c) a torch fallback that gathers the paged K/V then calls SDPA, and (d) the
HBM floor: bytes that must move (K/V read, q read, output written) over the device-to-device
copy bandwidth measured in the same run (bytes read + written per second). The pointwise
kernels and prefill attention are timed against their torch references / SDPA. Times are
medians from ``triton.testing.do_bench`` (which flushes L2 between runs), in microseconds.
Importing this module needs neither a GPU nor Triton. A run takes a few minutes on an H100,
most of it FlexAttention compiling once per decode shape.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from kernels.activation import silu_and_mul, silu_and_mul_ref
from kernels.norm import rms_norm, rms_norm_ref
from kernels.paged_attention import (
    paged_decode_attention,
    paged_prefill_attention,
    write_kv_ref,
)
from kernels.rope import apply_rope_ref, rope_and_write_kv, rope_cos_sin_cache

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 32, 8, 128, 16
DTYPE = torch.bfloat16
DECODE_BATCHES = (1, 8, 64, 256)
DECODE_CONTEXTS = (1024, 4096)
POINTWISE_TOKENS, HIDDEN = 8192, 4096
PREFILL_TOKENS = 8192
MIXED_POINTS = ((32, 480), (128, 384), (8, 1016), (2, 510))
"""(decodes, chunk tokens) of the mixed-step attention points (``--only mixed``)."""
CHUNK_TOKENS, CHUNK_CONTEXTS = 1024, (1024, 2048, 4096, 7168)
"""``--only chunks``: a prefill chunk of CHUNK_TOKENS ending at each context (a pipeline
micro-batch's chunk of a long prompt)."""
CHUNK_TILES = ((128, 128, 8, 2), (128, 64, 8, 2), (128, 128, 8, 3), (64, 64, 4, 2), (256, 64, 8, 2))
"""(BLOCK_M, BLOCK_N, warps, stages) of the prefill kernel that ``--only chunks`` tries; the
first is the default (kernels/paged_prefill.py ``prefill_tiles``)."""
CHUNK_TOLERANCE = 0.05
"""Largest |ours - SDPA| accepted in ``--only chunks``: the outputs are bf16 averages of
random values, well below 1, so rounding stays far under it, while a wrong mask or key range
changes them by about their own size."""


def _time_us(fn: Callable[[], Any]) -> float:
    """Median GPU time of ``fn`` in microseconds (L2 flushed before each run)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def _time_graph_us(fn: Callable[[], Any]) -> float:
    """Median time of ``fn`` replayed from a CUDA graph, in microseconds (no launch overhead)."""
    import triton.testing

    return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median") * 1e3


def _try(fn: Callable[[], float], errors: list[str], label: str) -> float | None:
    """Runs one measurement; a failure becomes None plus a note in ``errors`` (not raised, so
    one unsupported baseline does not cost the rest of the table)."""
    try:
        return fn()
    except Exception as e:  # reported in the row's "errors", not hidden
        errors.append(f"{label}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        return None


def measure_copy_bandwidth(device: torch.device, nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    us = _time_us(lambda: dst.copy_(src))
    return 2 * nbytes / (us * 1e-6)


def _sdpa_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=HEAD_DIM**-0.5)


@dataclass
class DecodeCase:
    """One decode batch: paged cache and the same K/V laid out contiguously."""

    q: torch.Tensor  # [batch, NUM_HEADS, HEAD_DIM]
    kv_cache: torch.Tensor  # [num_blocks, 1, 2, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM]
    block_tables: torch.Tensor  # [batch, context // BLOCK_SIZE] int32, shuffled block ids
    seq_lens: torch.Tensor  # [batch] int32, all == context
    k: torch.Tensor  # [batch, NUM_KV_HEADS, context, HEAD_DIM] contiguous
    v: torch.Tensor  # [batch, NUM_KV_HEADS, context, HEAD_DIM] contiguous

    @property
    def floor_bytes(self) -> int:
        """Bytes decode attention must move: all K/V, q, the output, block tables."""
        elem = self.q.element_size()
        return 2 * self.k.numel() * elem + 2 * self.q.numel() * elem + self.block_tables.nbytes


def make_decode_case(batch: int, context: int, device: torch.device) -> DecodeCase:
    """Random bf16 decode inputs; blocks are handed out in a random order, as after churn."""
    blocks_per_seq = context // BLOCK_SIZE
    num_blocks = batch * blocks_per_seq
    kv_cache = torch.randn(
        num_blocks, 1, 2, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, dtype=DTYPE, device=device
    )
    tables = torch.randperm(num_blocks, device=device).view(batch, blocks_per_seq).int()
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    q = torch.randn(batch, NUM_HEADS, HEAD_DIM, dtype=DTYPE, device=device)
    k, v = _gather_contiguous(kv_cache, tables)
    return DecodeCase(q, kv_cache, tables, seq_lens, k.contiguous(), v.contiguous())


def _gather_contiguous(
    kv_cache: torch.Tensor, block_tables: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """What a torch fallback does: gather every sequence's blocks; K, V [B, Hkv, S, D] views."""
    batch = block_tables.shape[0]
    kv = kv_cache[block_tables.long(), 0]  # [B, blocks, 2, BLOCK_SIZE, Hkv, D]
    k = kv[:, :, 0].reshape(batch, -1, NUM_KV_HEADS, HEAD_DIM).transpose(1, 2)
    v = kv[:, :, 1].reshape(batch, -1, NUM_KV_HEADS, HEAD_DIM).transpose(1, 2)
    return k, v


def _grouped_query(q: torch.Tensor) -> torch.Tensor:
    """[B, H, D] -> [B, Hkv, H // Hkv, D]: a KV head's query heads as its query rows, so a
    non-causal SDPA reads each K/V once (query head h uses KV head h // group)."""
    return q.view(q.shape[0], NUM_KV_HEADS, NUM_HEADS // NUM_KV_HEADS, HEAD_DIM)


@functools.cache
def _compiled_flex_attention() -> Callable[..., torch.Tensor]:
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex_decode_fn(case: DecodeCase) -> Callable[[], torch.Tensor]:
    """FlexAttention decode on contiguous K/V; compiles for this shape before returning."""
    flex = _compiled_flex_attention()
    q4 = case.q.unsqueeze(2)  # [B, H, 1, D]

    def run() -> torch.Tensor:
        return flex(q4, case.k, case.v, scale=HEAD_DIM**-0.5, enable_gqa=True)

    run()  # compile outside the timed region
    return run


def bench_decode(batch: int, context: int, bandwidth: float, device: torch.device) -> dict:
    """One decode row: ours (eager and CUDA graph) vs SDPA, FlexAttention, gather+SDPA, floor."""
    case = make_decode_case(batch, context, device)
    errors: list[str] = []
    scale = HEAD_DIM**-0.5
    qg = _grouped_query(case.q)

    def ours() -> torch.Tensor:
        return paged_decode_attention(
            case.q, case.kv_cache, 0, case.block_tables, case.seq_lens, scale
        )

    def gather_sdpa() -> torch.Tensor:
        k, v = _gather_contiguous(case.kv_cache, case.block_tables)
        return _sdpa_flash(qg, k, v, causal=False)

    row = {
        "kernel": "paged_decode_attention",
        "shape": f"batch={batch} ctx={context}",
        "ours_us": _try(lambda: _time_us(ours), errors, "ours"),
        "ours_graph_us": _try(lambda: _time_graph_us(ours), errors, "ours_graph"),
        "baseline": "sdpa_flash_contiguous",
        "baseline_us": _try(
            lambda: _time_us(lambda: _sdpa_flash(qg, case.k, case.v, False)), errors, "sdpa"
        ),
        "flex_us": _try(lambda: _time_us(_flex_decode_fn(case)), errors, "flex"),
        "gather_sdpa_us": _try(lambda: _time_us(gather_sdpa), errors, "gather_sdpa"),
        "floor_us": case.floor_bytes / bandwidth * 1e6,
        "errors": errors,
    }
    return row


def bench_prefill(device: torch.device) -> dict:
    """One 8k-token causal prefill (no cached prefix) vs SDPA flash on contiguous K/V."""
    errors: list[str] = []
    tokens = PREFILL_TOKENS
    case = make_decode_case(1, tokens, device)  # reuses the cache layout; q replaced below
    q = torch.randn(tokens, NUM_HEADS, HEAD_DIM, dtype=DTYPE, device=device)
    qsl = torch.tensor([0, tokens], dtype=torch.int32, device=device)
    q4 = q.transpose(0, 1).unsqueeze(0)  # [1, H, S, D]
    group = NUM_HEADS // NUM_KV_HEADS
    k_full = case.k.repeat_interleave(group, dim=1)  # SDPA flash wants equal head counts
    v_full = case.v.repeat_interleave(group, dim=1)

    def ours() -> torch.Tensor:
        return paged_prefill_attention(
            q, case.kv_cache, 0, case.block_tables, case.seq_lens, qsl, tokens, HEAD_DIM**-0.5
        )

    flops = 4 * tokens * tokens * NUM_HEADS * HEAD_DIM / 2  # QK^T and PV, causal half
    row = {
        "kernel": "paged_prefill_attention",
        "shape": f"1 seq x {tokens} tokens, causal",
        "ours_us": _try(lambda: _time_us(ours), errors, "ours"),
        "baseline": "sdpa_flash_causal",
        "baseline_us": _try(
            lambda: _time_us(lambda: _sdpa_flash(q4, k_full, v_full, True)), errors, "sdpa"
        ),
        "floor_us": None,
        "errors": errors,
    }
    for key in ("ours", "baseline"):
        us = row[f"{key}_us"]
        row[f"{key}_tflops"] = flops / (us * 1e-6) / 1e12 if us else None
    return row


def bench_mixed(device: torch.device, decodes: int = 32, chunk: int = 480) -> dict:
    """A mixed step's attention, as the engine runs it (one layer): ``decodes`` decodes and
    one ``chunk``-token prefill chunk, each over 1,024 tokens of context, with the decodes
    split off to the decode kernel (``AttentionMetadata.num_decodes``) vs the whole step in
    the prefill kernel (its tiles of 128 queries hold one real row per decode). Each is timed
    as launched (``*_us``) and replayed from a CUDA graph (``*_graph_us``: GPU time alone)."""
    from attention.metadata import AttentionMetadata
    from attention.triton_backend import TritonBackend

    errors: list[str] = []
    context = 1024
    case = make_decode_case(decodes + 1, context + chunk, device)
    q = torch.randn(decodes + chunk, NUM_HEADS, HEAD_DIM, dtype=DTYPE, device=device)
    lens = [1] * decodes + [chunk]
    qsl = torch.tensor([0, *lens], device=device).cumsum(0).to(torch.int32)
    seq_lens = torch.tensor([context] * decodes + [context + chunk], device=device)
    slots = torch.zeros(q.shape[0], dtype=torch.int64, device=device)
    meta = AttentionMetadata(slots, case.block_tables, seq_lens.int(), qsl, chunk, context + chunk)
    split, backend = meta.with_decodes(decodes), TritonBackend()

    def ours() -> torch.Tensor:
        return backend.attention(q, case.kv_cache, 0, split)

    def one_kernel() -> torch.Tensor:
        return backend.attention(q, case.kv_cache, 0, meta)

    return {
        "kernel": "mixed-step attention",
        "shape": f"{decodes} decodes + {chunk}-token chunk, 1k ctx",
        "ours_us": _try(lambda: _time_us(ours), errors, "ours"),
        "ours_graph_us": _try(lambda: _time_graph_us(ours), errors, "ours graph"),
        "baseline": "one prefill kernel",
        "baseline_us": _try(lambda: _time_us(one_kernel), errors, "one"),
        "baseline_graph_us": _try(lambda: _time_graph_us(one_kernel), errors, "one graph"),
        "floor_us": None,
        "errors": errors,
    }


def _pointwise_row(
    name: str,
    shape: str,
    ours: Callable[[], Any],
    ref: Callable[[], Any],
    nbytes: int,
    bandwidth: float,
) -> dict:
    errors: list[str] = []
    return {
        "kernel": name,
        "shape": shape,
        "ours_us": _try(lambda: _time_us(ours), errors, "ours"),
        "baseline": "torch_ref",
        "baseline_us": _try(lambda: _time_us(ref), errors, "ref"),
        "floor_us": nbytes / bandwidth * 1e6,
        "errors": errors,
    }


def bench_pointwise(bandwidth: float, device: torch.device) -> list[dict]:
    """rms_norm, silu_and_mul and rope_and_write_kv at 8192 tokens x 4096 hidden, bf16."""
    t, h = POINTWISE_TOKENS, HIDDEN
    x, residual = torch.randn(2, t, h, dtype=DTYPE, device=device)
    weight = torch.randn(h, dtype=DTYPE, device=device)
    gate_up = torch.randn(t, 2 * h, dtype=DTYPE, device=device)
    elem = x.element_size()
    rows = [
        _pointwise_row(
            "rms_norm(+residual)", f"{t}x{h}",
            lambda: rms_norm(x, weight, 1e-5, residual),
            lambda: rms_norm_ref(x, weight, 1e-5, residual),
            4 * x.numel() * elem + weight.nbytes, bandwidth,
        ),
        _pointwise_row(
            "silu_and_mul", f"{t}x2*{h}",
            lambda: silu_and_mul(gate_up),
            lambda: silu_and_mul_ref(gate_up),
            gate_up.nbytes * 3 // 2, bandwidth,
        ),
    ]  # fmt: skip
    rows.append(_rope_row(bandwidth, device))
    return rows


def _rope_row(bandwidth: float, device: torch.device) -> dict:
    t, hkv = POINTWISE_TOKENS, NUM_KV_HEADS
    qkv = torch.randn(t, (NUM_HEADS + 2 * hkv) * HEAD_DIM, dtype=DTYPE, device=device)
    q, k, v = qkv.split([NUM_HEADS * HEAD_DIM, hkv * HEAD_DIM, hkv * HEAD_DIM], dim=1)
    q, k, v = (x.view(t, -1, HEAD_DIM) for x in (q, k, v))
    positions = torch.arange(t, device=device)
    cos_sin = rope_cos_sin_cache(HEAD_DIM, t, 500000.0).to(device)
    cache = torch.empty(
        t // BLOCK_SIZE, 1, 2, BLOCK_SIZE, hkv, HEAD_DIM, dtype=DTYPE, device=device
    )
    slots = torch.randperm(t, device=device)

    def ref() -> None:
        q_rot, k_rot = apply_rope_ref(q, k, positions, cos_sin)
        write_kv_ref(k_rot, v, cache, 0, slots)

    # Read q, k, v, cos/sin rows and slots; write q_rot, k_rot and the cache's K and V.
    elem = qkv.element_size()
    reads = qkv.nbytes + t * HEAD_DIM * cos_sin.element_size() + slots.nbytes
    nbytes = reads + (q.numel() + 3 * k.numel()) * elem
    return _pointwise_row(
        "rope_and_write_kv", f"{t} tok, {NUM_HEADS}/{hkv} heads, d={HEAD_DIM}",
        lambda: rope_and_write_kv(q, k, v, positions, cos_sin, cache, 0, slots),
        ref, nbytes, bandwidth,
    )  # fmt: skip


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _fmt(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def print_table(rows: list[dict]) -> None:
    """Prints the rows, times in microseconds, with ours/baseline and ours/floor ratios."""
    head = ["kernel", "shape", "ours", "graph", "baseline", "flex", "gather+sdpa", "floor",
            "ours/base", "ours/floor"]  # fmt: skip
    widths = [24, 30, 9, 9, 9, 9, 11, 9, 9, 10]
    print(" ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
    for r in rows:
        cells = [
            r["kernel"], r["shape"], _fmt(r["ours_us"]), _fmt(r.get("ours_graph_us")),
            _fmt(r["baseline_us"]), _fmt(r.get("flex_us")), _fmt(r.get("gather_sdpa_us")),
            _fmt(r["floor_us"]), _fmt(r["ours_over_baseline"], 2), _fmt(r["ours_over_floor"], 2),
        ]  # fmt: skip
        print(" ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)))
        if r.get("baseline_graph_us") is not None:
            print(f"    baseline from a CUDA graph: {_fmt(r['baseline_graph_us'])} us")
        for err in r["errors"]:
            print(f"    ! {err}")


def bench_chunk_attention(
    device: torch.device,
    context: int,
    chunk: int = CHUNK_TOKENS,
    tiles: tuple[tuple[int, int, int, int], ...] = CHUNK_TILES,
) -> list[dict]:
    """One layer's attention of a ``chunk``-token prefill chunk ending at position
    ``context`` of one sequence (the engine's paged prefill kernel), one row per tile
    configuration, each against SDPA's flash backend on the same K/V laid out contiguously
    with a bottom-right causal mask (timed once). TFLOP/s count ``4 * heads * head_dim`` per
    query-key pair (``causal_pairs``)."""
    from torch.nn.attention.bias import causal_lower_right

    from kernels.paged_prefill import PrefillTiles, causal_pairs

    case = make_decode_case(1, context, device)  # the sequence's whole context is cached
    q = torch.randn(chunk, NUM_HEADS, HEAD_DIM, dtype=DTYPE, device=device)
    qsl = torch.tensor([0, chunk], dtype=torch.int32, device=device)
    group = NUM_HEADS // NUM_KV_HEADS
    q4 = q.transpose(0, 1).unsqueeze(0)  # [1, H, chunk, D]
    k_full = case.k.repeat_interleave(group, dim=1)
    v_full = case.v.repeat_interleave(group, dim=1)
    mask = causal_lower_right(chunk, context)
    flops = 4 * NUM_HEADS * HEAD_DIM * causal_pairs(chunk, context - chunk)

    def sdpa() -> torch.Tensor:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(
                q4, k_full, v_full, attn_mask=mask, scale=HEAD_DIM**-0.5
            )

    base_errors: list[str] = []
    baseline_us = _try(lambda: _time_us(sdpa), base_errors, "sdpa")
    expected = None if baseline_us is None else sdpa()[0].transpose(0, 1).float()
    rows = []
    for t in tiles:
        errors = list(base_errors)
        tile = PrefillTiles(*t)

        def ours(tile: PrefillTiles = tile) -> torch.Tensor:
            return paged_prefill_attention(
                q, case.kv_cache, 0, case.block_tables, case.seq_lens, qsl, chunk,
                HEAD_DIM**-0.5, tiles=tile,
            )  # fmt: skip

        us = _try(lambda: _time_us(ours), errors, "ours")
        diff = None
        if us is not None and expected is not None:  # the same attention, or no comparison
            diff = (ours().float() - expected).abs().max().item()
            if diff > CHUNK_TOLERANCE:
                errors.append(f"ours differs from sdpa by {diff:.3g} (> {CHUNK_TOLERANCE})")
        rows.append(
            {
                "kernel": "paged_prefill_attention",
                "shape": f"{chunk} at {context}, {t[0]}x{t[1]} w{t[2]} s{t[3]}",
                "tiles": list(t),
                "ours_us": us,
                "baseline": "sdpa_flash_lower_right",
                "baseline_us": baseline_us,
                "floor_us": None,
                "max_abs_diff": diff,
                "ours_tflops": flops / (us * 1e-6) / 1e12 if us else None,
                "baseline_tflops": flops / (baseline_us * 1e-6) / 1e12 if baseline_us else None,
                "errors": errors,
            }
        )
    return rows


def run_kernel_bench(out_json: str | None = None, only: str | None = None) -> dict:
    """Runs the benchmark on the current CUDA device; prints tables, returns the results.

    ``only``: None runs everything; ``"mixed"`` only the mixed-step attention rows
    (:func:`bench_mixed` at ``MIXED_POINTS``); ``"skinny"`` only the skinny GEMM tables
    (kernels/bench_skinny.py). Returns ``{"device", "torch", "triton", "copy_bandwidth_GBps",
    "rows", "skinny_rows", "skinny_sweep"}``; each of ``rows`` has ``kernel``, ``shape``, times
    in microseconds (``ours_us``, ``baseline_us``, ``floor_us``; decode also
    ``ours_graph_us``, ``flex_us``, ``gather_sdpa_us``; None where a measurement failed, with
    the reason in ``errors``) and the ratios ``ours_over_baseline`` and ``ours_over_floor``;
    the skinny keys are :func:`~kernels.bench_skinny.bench_skinny`'s and
    :func:`~kernels.bench_skinny.sweep_skinny`'s rows. Writes the same dict as JSON to
    ``out_json`` when given. Raises RuntimeError without a CUDA device, ValueError for an
    unknown ``only``.
    """
    if only not in (None, "skinny", "mixed", "chunks"):
        raise ValueError(f"only must be None, 'skinny', 'mixed' or 'chunks', got {only!r}")
    if not torch.cuda.is_available():
        raise RuntimeError("run_kernel_bench needs a CUDA GPU")
    import triton

    from kernels.bench_skinny import bench_skinny, print_skinny, sweep_skinny

    device = torch.device("cuda")
    bandwidth = measure_copy_bandwidth(device)
    if only == "mixed":
        rows = _with_ratios([bench_mixed(device, d, c) for d, c in MIXED_POINTS])
    elif only == "chunks":
        rows = _with_ratios([r for c in CHUNK_CONTEXTS for r in bench_chunk_attention(device, c)])
    else:
        rows = [] if only else _attention_and_pointwise_rows(bandwidth, device)
    skinny = only not in ("mixed", "chunks")
    skinny_rows = bench_skinny(bandwidth, device) if skinny else []
    skinny_sweep = sweep_skinny(bandwidth, device) if skinny else []
    result = {
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "rows": rows,
        "skinny_rows": skinny_rows,
        "skinny_sweep": skinny_sweep,
    }
    print(f"{result['device']}: copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write)")
    if rows:
        print_table(rows)
        for r in rows:
            if r.get("ours_tflops") is not None and r["kernel"] == "paged_prefill_attention":
                base = _fmt(r.get("baseline_tflops"))
                print(f"{r['shape']}: {r['ours_tflops']:.0f} TFLOP/s (baseline {base})")
    if skinny:
        print_skinny(skinny_rows, skinny_sweep)
    if out_json:
        with open(out_json, "w") as f:
            json.dump(result, f, indent=2)
    return result


def _attention_and_pointwise_rows(bandwidth: float, device: torch.device) -> list[dict]:
    rows = []
    for context in DECODE_CONTEXTS:
        for batch in DECODE_BATCHES:
            rows.append(bench_decode(batch, context, bandwidth, device))
            torch.cuda.empty_cache()
    rows.append(bench_prefill(device))
    rows.append(bench_mixed(device))
    rows.extend(bench_pointwise(bandwidth, device))
    return _with_ratios(rows)


def _with_ratios(rows: list[dict]) -> list[dict]:
    for r in rows:
        r["ours_over_baseline"] = _ratio(r["ours_us"], r["baseline_us"])
        r["ours_over_floor"] = _ratio(r["ours_us"], r["floor_us"])
    return rows


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="kunserve bench kernels, with --only")
    parser.add_argument(
        "--only", choices=["skinny", "mixed", "chunks"], default=None, help="run only these tables"
    )
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    run_kernel_bench(args.output_json, args.only)
