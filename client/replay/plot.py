"""`--plot FILE.png`: one timeline figure of a replay, drawn from its result JSON.

Five panels share the time axis (seconds since the replay started): offered load and
completions, TTFT percentiles, requests running and waiting in the server, KV-cache usage per
instance, and each instance's state (normal, dropping, pipelined, restoring, ...). It reads only
the result document, so a saved JSON can be re-plotted later.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

STATE_COLORS = {
    "starting": "#bdbdbd",
    "normal": "#4caf50",
    "dropping": "#ff9800",
    "pipelined": "#9c27b0",
    "restoring": "#2196f3",
    "failed": "#e53935",
    "unspecified": "#eeeeee",
}


def plot_timeline(doc: dict[str, Any], path: Path) -> Path:
    """Draws the replay timeline of result document `doc` to `path` (PNG); returns the path."""
    ts, samples = doc["time_series"], doc["server_samples"]
    t_end = max(float(doc["duration"]), len(ts["t_s"]) * 1.0 if ts["t_s"] else 1.0)
    fig, axes = plt.subplots(
        5, 1, figsize=(12, 12), sharex=True, gridspec_kw={"height_ratios": [3, 3, 2, 2, 1.2]}
    )
    _plot_load(axes[0], ts)
    _plot_ttft(axes[1], ts, (doc.get("goodput_slos_ms") or {}).get("ttft"))
    _plot_queue(axes[2], samples, t_end)
    _plot_kv(axes[3], samples)
    _plot_states(axes[4], samples, float(doc["duration"]))
    axes[-1].set_xlim(0, t_end)
    axes[-1].set_xlabel("time since replay start (s)")
    fig.suptitle(_title(doc), fontsize=11)
    fig.subplots_adjust(left=0.09, right=0.98, bottom=0.05, top=0.95, hspace=0.12)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _title(doc: dict[str, Any]) -> str:
    start, end = doc["trace_window"]
    p99 = doc.get("p99_ttft_ms")
    p99_text = f", P99 TTFT {p99:.0f} ms" if p99 is not None else ""
    return (
        f"{doc['trace']} [{start:g}, {end:g}) s, time x{doc['time_scale']:g}, "
        f"load x{doc['load_scale']:g} | {doc['completed']} ok, {doc['failed']} failed"
        f"{p99_text} | {doc['model_id']}"
    )


def _plot_load(ax: Axes, ts: dict[str, list]) -> None:
    edges = [*ts["t_s"], ts["t_s"][-1] + 1.0] if ts["t_s"] else [0.0, 1.0]
    arrivals = ts["arrivals"] or [0]
    ax.stairs(arrivals, edges, fill=True, color="#90caf9", label="arrivals (on schedule)")
    ax.stairs(ts["completions"] or [0], edges, color="#1b5e20", linewidth=1.5, label="completed")
    ax.set_ylabel("requests / s")
    ax.set_ylim(0, 1.15 * max(max(arrivals), max(ts["completions"] or [0]), 1))
    handles, labels = ax.get_legend_handles_labels()
    if any(ts["failures"]):
        # Failures come in spikes (e.g. all at the drain cap): a cumulative count on their own
        # axis keeps the arrival and completion rates readable.
        cum = list(itertools.accumulate(ts["failures"]))
        twin = ax.twinx()
        twin.stairs(cum, edges, color="#e53935", linewidth=1.5, label="failed (cumulative)")
        twin.set_ylabel("failed (cumulative)", color="#e53935")
        twin.set_ylim(0, 1.15 * cum[-1])
        h2, l2 = twin.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)


def _plot_ttft(ax: Axes, ts: dict[str, list], slo_ms: float | None) -> None:
    keys = [k for k in ts if k.startswith("ttft_p")]
    drawn = False
    for key, color in zip(keys, ("#1e88e5", "#fb8c00", "#d81b60"), strict=False):
        points = [(t + 0.5, v) for t, v in zip(ts["t_s"], ts[key], strict=True) if v is not None]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker=".", color=color, label=key[5:].replace("_ms", "").upper())
            drawn = True
    if slo_ms:
        ax.axhline(slo_ms, color="black", linestyle="--", linewidth=1, label=f"SLO {slo_ms:g} ms")
    if drawn:
        ax.set_yscale("log")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_ylabel("TTFT (ms)\nby send second")
    ax.grid(alpha=0.3, which="both")


def _plot_queue(ax: Axes, samples: dict[str, Any], t_end: float) -> None:
    t = [*samples["t_s"], t_end]
    for key, color in (("num_running", "#43a047"), ("num_waiting", "#e53935")):
        total = [0.0] * len(samples["t_s"])
        for cols in samples["instances"].values():
            total = [a + (b or 0) for a, b in zip(total, cols[key], strict=True)]
        if total:
            ax.stairs(total, t, color=color, linewidth=1.5, label=key[4:])
    ax.set_ylabel("requests in\nserver")
    if samples["t_s"]:
        ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)


def _plot_kv(ax: Axes, samples: dict[str, Any]) -> None:
    t = samples["t_s"]
    for iid, cols in samples["instances"].items():
        points = [(x, 100.0 * v) for x, v in zip(t, cols["kv_usage"], strict=True) if v is not None]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, label=f"instance {iid}")
    ax.set_ylim(0, 105)
    ax.set_ylabel("KV cache\nused (%)")
    if ax.lines:
        ax.legend(loc="upper right", fontsize=8, ncol=4)
    else:
        ax.text(0.5, 0.5, "no server samples", transform=ax.transAxes, ha="center")
    ax.grid(alpha=0.3)


def _plot_states(ax: Axes, samples: dict[str, Any], t_end: float) -> None:
    """One row per instance, coloured by state from each sample to the next."""
    t = samples["t_s"]
    ids = list(samples["instances"])
    for row, iid in enumerate(ids):
        states = samples["instances"][iid]["state"]
        for k, state in enumerate(states):
            if state is None:
                continue
            t_next = t[k + 1] if k + 1 < len(t) else max(t_end, t[k])
            color = STATE_COLORS.get(state, "#eeeeee")
            ax.broken_barh([(t[k], t_next - t[k])], (row - 0.4, 0.8), color=color)
    ax.set_yticks(range(len(ids)), [f"inst {i}" for i in ids])
    ax.set_ylim(-0.6, max(len(ids), 1) - 0.4)
    seen = {s for i in ids for s in samples["instances"][i]["state"] if s}
    handles = [
        Patch(color=STATE_COLORS.get(s, "#eeeeee"), label=s) for s in STATE_COLORS if s in seen
    ]
    if handles:
        ax.legend(handles=handles, loc="upper right", fontsize=8, ncol=len(handles))
    ax.set_ylabel("state")
