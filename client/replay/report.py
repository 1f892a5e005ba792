"""Presenting a ReplayResult: the terminal table and the `--save-result` JSON.

The JSON keeps `vllm bench serve`'s key names (date, backend, num_prompts, duration, completed,
failed, request_throughput, mean_ttft_ms, p99_ttft_ms, ..., and with --save-detailed the
per-request arrays input_lens, output_lens, ttfts, itls, ...) so existing scripts read it, and
adds ours under new names (trace, time_scale, load_scale, time_series, server_samples, ...).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from client.replay.metrics import error_summary, instance_series, time_series

if TYPE_CHECKING:
    from client.replay.runner import ReplayResult

_TITLES = {
    "ttft": ("Time to First Token", "TTFT"),
    "tpot": ("Time per Output Token (excl. 1st token)", "TPOT"),
    "itl": ("Inter-token Latency", "ITL"),
    "e2el": ("End-to-end Latency", "E2EL"),
}


def _request_rate(result: ReplayResult) -> float | str:
    """vLLM's `request_rate`: the synthetic rate, else the schedule's mean rate (req/s)."""
    cfg = result.config
    if cfg.is_synthetic:
        return "inf" if math.isinf(cfg.request_rate) else cfg.request_rate
    span = result.workload.span_s
    return round(len(result.records) / span, 3) if span > 0 else "inf"


def _vllm_keys(result: ReplayResult) -> dict[str, Any]:
    cfg, m = result.config, result.metrics
    out: dict[str, Any] = {
        "date": result.date,
        "endpoint_type": "grpc",
        "backend": "grpc",
        "label": cfg.label,
        "model_id": result.model.served_model_name,
        "tokenizer_id": cfg.tokenizer or "server",
        "num_prompts": len(result.records),
        "request_rate": _request_rate(result),
        "burstiness": cfg.burstiness,
        "max_concurrency": cfg.max_concurrency,
        **cfg.metadata_dict,
        "duration": m.duration_s,
        "completed": m.completed,
        "failed": m.failed,
        "total_input_tokens": m.total_input_tokens,
        "total_output_tokens": m.total_output_tokens,
        "request_throughput": m.request_throughput,
        "request_goodput": m.request_goodput,
        "output_throughput": m.output_throughput,
        "total_token_throughput": m.total_token_throughput,
        "max_output_tokens_per_s": m.max_output_tokens_per_s,
        "max_concurrent_requests": m.max_concurrent_requests,
    }
    for name, s in m.stats.items():
        out[f"mean_{name}_ms"] = s.mean_ms
        out[f"median_{name}_ms"] = s.median_ms
        out[f"std_{name}_ms"] = s.std_ms
        for label, value in s.percentiles_ms.items():
            out[f"{label}_{name}_ms"] = value
    return out


def _per_request_arrays(result: ReplayResult) -> dict[str, list]:
    rs = result.records
    return {
        "input_lens": [r.input_len for r in rs],
        "output_lens": [r.output_tokens if r.success else 0 for r in rs],
        "ttfts": [r.ttft_s or 0.0 for r in rs],
        "itls": [r.itl_s for r in rs],
        "latencies": [r.latency_s or 0.0 for r in rs],
        "start_times": [r.start_s for r in rs],
        "queue_times": [None if r.start_s is None else r.start_s - r.scheduled_s for r in rs],
        "generated_texts": [r.generated_text for r in rs],
        "errors": [r.error for r in rs],
        "server_queue_times": [r.server_queue_s for r in rs],
        "server_ttfts": [r.server_ttft_s for r in rs],
        "server_prompt_lens": [r.server_prompt_tokens for r in rs],
        "request_ids": [r.request_id for r in rs],
        "scheduled_times": [r.scheduled_s for r in rs],
        "instance_ids": [r.instance_id for r in rs],
    }


def _our_keys(result: ReplayResult) -> dict[str, Any]:
    cfg, w = result.config, result.workload
    return {
        "host": cfg.host,
        "port": cfg.port,
        "trace": w.trace_name,
        "trace_window": [w.window_start_s, w.window_end_s],
        "num_traced_in_window": w.num_traced_in_window,
        "time_scale": cfg.time_scale,
        "load_scale": cfg.load_scale,
        "seed": cfg.seed,
        "max_model_len": result.model.max_model_len,
        "max_input_len": cfg.max_input_len,
        "max_output_len": cfg.max_output_len,
        "num_clipped": w.num_clipped,
        "num_clipped_input": w.num_clipped_input,
        "num_clipped_output": w.num_clipped_output,
        "goodput_slos_ms": cfg.goodput_slos_ms or None,
        "slo_attainment": result.metrics.slo_attainment,
        "drain_timeout_s": cfg.drain_timeout_s,
        "hard_cap_s": result.hard_cap_s,
        "num_aborted_at_cap": result.num_aborted_at_cap,
        "error_summary": [{"error": e, "count": n} for e, n in error_summary(result.records)],
        "num_server_sample_errors": result.num_sample_errors,
        "client_stalls": {
            "count": len(result.client_stalls),
            "max_ms": 1e3 * max((late for _, late in result.client_stalls), default=0.0),
            "times_s": [round(t, 3) for t, _ in result.client_stalls],
        },
        "time_series": time_series(result.records, result.samples, result.duration_s),
        "server_samples": instance_series(result.samples),
        "transition_gaps": result.transition_gaps,
    }


def result_to_json(result: ReplayResult) -> dict[str, Any]:
    """The `--save-result` document (a JSON-serializable dict)."""
    doc = _vllm_keys(result)
    if result.config.save_detailed:
        doc.update(_per_request_arrays(result))
    doc.update(_our_keys(result))
    return doc


def default_result_filename(result: ReplayResult) -> str:
    """`{label}-{rate}qps[-concurrency{N}]-{model}-{date}.json`, vLLM's pattern; a trace
    replay puts `{trace}-x{time_scale}` where the rate goes."""
    cfg = result.config
    if cfg.is_synthetic:
        load = f"{_request_rate(result)}qps"
    else:
        load = f"{Path(result.workload.trace_name).name}-x{cfg.time_scale:g}"
    conc = f"-concurrency{cfg.max_concurrency}" if cfg.max_concurrency else ""
    model = (result.model.served_model_name or "model").rstrip("/").split("/")[-1]
    return f"{cfg.label}-{load}{conc}-{model}-{result.date}.json"


def saved_result_path(result: ReplayResult) -> Path:
    """Where `--save-result` writes: result_dir / (result_filename or the default name)."""
    cfg = result.config
    name = cfg.result_filename or default_result_filename(result)
    return Path(cfg.result_dir or ".") / name


def save_result(result: ReplayResult, path: Path) -> Path:
    """Writes the result JSON to `path` (creating folders); returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result_to_json(result), indent=2) + "\n")
    return path


def _line(name: str, value: object) -> str:
    if isinstance(value, float):
        return f"{name:<40} {value:<10.2f}"
    return f"{name:<40} {value!s:<10}"


def format_table(result: ReplayResult) -> str:
    """The terminal summary, in `vllm bench serve`'s layout, plus trace and error lines."""
    cfg, w, m = result.config, result.workload, result.metrics
    lines = [
        f"{' Serving Benchmark Result ':=^50}",
        _line(
            "Trace:",
            f"{w.trace_name} [{w.window_start_s:g}, {w.window_end_s:g}) s, "
            f"time x{cfg.time_scale:g}, load x{cfg.load_scale:g}",
        ),
        _line("Successful requests:", m.completed),
        _line("Failed requests:", m.failed),
        _line("Clipped requests (input/output):", f"{w.num_clipped_input}/{w.num_clipped_output}"),
        _line("Maximum request concurrency:", cfg.max_concurrency),
        _line("Benchmark duration (s):", m.duration_s),
        _line("Total input tokens:", m.total_input_tokens),
        _line("Total generated tokens:", m.total_output_tokens),
        _line("Request throughput (req/s):", m.request_throughput),
    ]
    if m.request_goodput is not None:
        lines.append(_line("Request goodput (req/s):", m.request_goodput))
        lines.append(_line("SLO attainment (%):", 100.0 * (m.slo_attainment or 0.0)))
    lines += [
        _line("Output token throughput (tok/s):", m.output_throughput),
        _line("Peak output token throughput (tok/s):", m.max_output_tokens_per_s),
        _line("Peak concurrent requests:", m.max_concurrent_requests),
        _line("Total token throughput (tok/s):", m.total_token_throughput),
    ]
    for name, s in m.stats.items():
        title, short = _TITLES[name]
        lines.append(f"{title:-^50}")
        lines.append(_line(f"Mean {short} (ms):", s.mean_ms))
        lines.append(_line(f"Median {short} (ms):", s.median_ms))
        lines.append(_line(f"Std {short} (ms):", s.std_ms))
        for label, value in s.percentiles_ms.items():
            lines.append(_line(f"P{label[1:]} {short} (ms):", value))
    if result.client_stalls:
        worst = max(late for _, late in result.client_stalls)
        lines.append(f"{'Client':-^50}")
        lines.append(_line("Client stalls (event loop late):", len(result.client_stalls)))
        lines.append(_line("Worst client stall (ms):", 1e3 * worst))
    changes = result.transition_gaps
    if changes:
        lines.append(f"{'Transitions (token gaps across)':-^50}")
    for c in changes:
        what = ", ".join(f"{i}: {v}" for i, v in c["changes"].items())
        paused = c.get("paused_ms")
        where = "" if paused is None else f"  (parked {paused:.1f} ms)"
        lines.append(f"{c['t_s'][0]:.1f}-{c['t_s'][1]:.1f} s  {what}{where}")
        if c["num_requests"]:
            lines.append(
                f"  {c['num_requests']} decoding: largest gap {c['max_gap_ms']:.1f} ms, "
                f"{c['max_gap_x_tbt']:.1f}x its TBT (median {c['median_gap_x_tbt']:.1f}x); "
                f"largest gap before {c['max_gap_before_ms']:.1f} ms"
            )
    errors = error_summary(result.records)
    if errors:
        lines.append(f"{'Errors':-^50}")
        lines += [f"{n:>7}  {e}" for e, n in errors[:10]]
        if len(errors) > 10:
            lines.append(f"    ... and {len(errors) - 10} other messages")
    lines.append("=" * 50)
    return "\n".join(lines)
