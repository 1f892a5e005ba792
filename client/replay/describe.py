"""`kunserve replay --describe`: a trace's arrival-rate summary and its busiest windows.

Pure arithmetic on arrival times plus one formatting function; it never contacts a server.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from client.replay.traces import Trace


@dataclass(frozen=True)
class BusyWindow:
    """A window [start_s, start_s + width_s) of trace time and the requests arriving in it."""

    start_s: float
    width_s: float
    num_requests: int
    mean_input_len: float
    mean_output_len: float

    @property
    def rate(self) -> float:
        """Mean arrival rate in the window (requests/s)."""
        return self.num_requests / self.width_s


@dataclass(frozen=True)
class TraceSummary:
    """Arrival and length statistics of (a window of) a trace. Rates in requests/s."""

    name: str
    num_requests: int
    start_s: float
    end_s: float
    mean_rate: float
    per_second_rate: dict[str, float]
    input_len: dict[str, float]
    output_len: dict[str, float]
    busiest: tuple[BusyWindow, ...]
    num_skipped: int = 0


def busiest_windows(arrivals_s: np.ndarray, width_s: float, top_k: int) -> list[tuple[float, int]]:
    """The top_k non-overlapping windows of `width_s` seconds with the most arrivals.

    Each candidate window starts at an arrival. Returns (start_s, count) pairs, busiest first;
    ties go to the earlier window.

    Args:
        arrivals_s: sorted arrival times, float64 [n], seconds.
    """
    if len(arrivals_s) == 0:
        return []
    ends = np.searchsorted(arrivals_s, arrivals_s + width_s, side="left")
    counts = ends - np.arange(len(arrivals_s))
    order = np.lexsort((arrivals_s, -counts))
    picked: list[tuple[float, int]] = []
    for i in order:
        start = float(arrivals_s[i])
        if all(abs(start - s) >= width_s for s, _ in picked):
            picked.append((start, int(counts[i])))
            if len(picked) == top_k:
                break
    return picked


def _quantiles(values: np.ndarray) -> dict[str, float]:
    if len(values) == 0:
        return {"mean": 0.0, "p50": 0.0, "p90": 0.0, "p99": 0.0, "max": 0.0}
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {
        "mean": float(np.mean(values)),
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "max": float(np.max(values)),
    }


def summarize_trace(
    trace: Trace,
    start_s: float = 0.0,
    duration_s: float | None = None,
    width_s: float = 10.0,
    top_k: int = 5,
) -> TraceSummary:
    """Summarizes the arrivals of `trace` in [start_s, start_s + duration_s) (trace seconds)."""
    t = trace.arrivals_s
    end_s = trace.span_s if duration_s is None else start_s + duration_s
    lo = int(np.searchsorted(t, start_s, side="left"))
    hi = int(np.searchsorted(t, end_s, side="right" if duration_s is None else "left"))
    t_win = t[lo:hi]
    inputs = np.array([r.input_len for r in trace.records[lo:hi]], dtype=np.float64)
    outputs = np.array([r.output_len for r in trace.records[lo:hi]], dtype=np.float64)
    span = max(end_s - start_s, 1e-9)
    seconds = np.floor(t_win - start_s).astype(np.int64)
    per_second = np.bincount(seconds, minlength=int(np.ceil(span))) if len(t_win) else np.zeros(1)
    busiest = []
    for w_start, count in busiest_windows(t_win, width_s, top_k):
        a = int(np.searchsorted(t_win, w_start, side="left"))
        busiest.append(
            BusyWindow(
                w_start,
                width_s,
                count,
                float(inputs[a : a + count].mean()),
                float(outputs[a : a + count].mean()),
            )
        )
    return TraceSummary(
        name=trace.name,
        num_requests=len(t_win),
        start_s=start_s,
        end_s=end_s,
        mean_rate=len(t_win) / span,
        per_second_rate=_quantiles(per_second.astype(np.float64)),
        input_len=_quantiles(inputs),
        output_len=_quantiles(outputs),
        busiest=tuple(busiest),
        num_skipped=trace.num_skipped,
    )


def format_summary(s: TraceSummary) -> str:
    """Renders a TraceSummary as the text `--describe` prints."""
    r, i, o = s.per_second_rate, s.input_len, s.output_len
    lines = [
        f"Trace {s.name}: {s.num_requests} requests in [{s.start_s:.1f}, {s.end_s:.1f}] s "
        f"(trace time), mean {s.mean_rate:.2f} req/s"
        + (f"; {s.num_skipped} rows without tokens skipped" if s.num_skipped else ""),
        f"  requests per 1 s bin: p50 {r['p50']:.0f}  p90 {r['p90']:.0f}  p99 {r['p99']:.0f}  "
        f"max {r['max']:.0f}",
        f"  input tokens:  mean {i['mean']:.0f}  p50 {i['p50']:.0f}  p99 {i['p99']:.0f}  "
        f"max {i['max']:.0f}",
        f"  output tokens: mean {o['mean']:.0f}  p50 {o['p50']:.0f}  p99 {o['p99']:.0f}  "
        f"max {o['max']:.0f}",
    ]
    if s.busiest:
        width = s.busiest[0].width_s
        lines.append(f"  busiest {width:g} s windows (start s, requests, req/s, mean in/out):")
        for k, w in enumerate(s.busiest, 1):
            lines.append(
                f"    {k}. t={w.start_s:8.1f}  {w.num_requests:5d}  {w.rate:7.1f}  "
                f"{w.mean_input_len:7.0f} / {w.mean_output_len:.0f}"
            )
    return "\n".join(lines)
