"""Benchmark metric arithmetic, defined as `vllm bench serve` defines it. Pure: no I/O, no clock.

Per request (successful requests only, as in vLLM):
- TTFT: send to the first delta.
- ITL: the gaps between consecutive deltas, pooled over all requests (one gap per delta, as
  vLLM records one per streamed chunk, even when a delta carries several tokens).
- TPOT: (E2EL - TTFT) / (output_tokens - 1), only for requests with more than one output
  token; for goodput, a request with <= 1 output token has TPOT 0.
- E2EL: send to the Finished event.

Totals: request_throughput = completed / duration; output_throughput = sum(output tokens) /
duration; total_token_throughput adds the successful requests' input tokens; request_goodput =
requests meeting every `--goodput` SLO (value <= SLO, DistServe) / duration. Ours:
slo_attainment = those requests / all requests (failed ones miss every SLO).
Stats are in milliseconds: mean, median, std (population) and linear-interpolated percentiles;
an empty list gives 0 for every stat, as in vLLM.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from client.replay.records import RequestRecord, ServerSample

METRIC_NAMES: tuple[str, ...] = ("ttft", "tpot", "itl", "e2el")
"""Metrics with latency statistics (`--percentile-metrics`)."""

GOODPUT_METRICS: tuple[str, ...] = ("ttft", "tpot", "e2el")
"""Metrics an SLO may be set on (`--goodput KEY:MS`)."""


def parse_goodput(specs: Iterable[str]) -> dict[str, float]:
    """Parses ["ttft:500", "tpot:50"] into {"ttft": 500.0, "tpot": 50.0} (milliseconds).

    Raises:
        ValueError: malformed pair, unknown metric, or a non-positive threshold.
    """
    slos: dict[str, float] = {}
    for spec in specs:
        name, sep, value = spec.partition(":")
        if not sep or name not in GOODPUT_METRICS:
            raise ValueError(
                f"goodput item {spec!r}: expected KEY:MS with KEY in {GOODPUT_METRICS}"
            )
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"goodput item {spec!r}: {value!r} is not a number") from None
        if not ms > 0:
            raise ValueError(f"goodput item {spec!r}: the threshold must be > 0 ms")
        slos[name] = ms
    return slos


def percentile_label(p: float) -> str:
    """90 -> "p90", 99.9 -> "p99.9": the key fragment vLLM uses (e.g. `p99.9_ttft_ms`)."""
    return f"p{int(p)}" if float(p).is_integer() else f"p{p:g}"


@dataclass(frozen=True)
class MetricStats:
    """Statistics of one metric, milliseconds; `percentiles_ms` is keyed "p90", "p99.9", ..."""

    mean_ms: float
    median_ms: float
    std_ms: float
    percentiles_ms: dict[str, float]


def summarize_ms(values_s: Sequence[float], percentiles: Sequence[float]) -> MetricStats:
    """Mean, median, std and percentiles of `values_s` (seconds), reported in milliseconds."""
    if len(values_s) == 0:
        return MetricStats(0.0, 0.0, 0.0, {percentile_label(p): 0.0 for p in percentiles})
    ms = np.asarray(values_s, dtype=np.float64) * 1000.0
    pcts = np.percentile(ms, list(percentiles)) if percentiles else []
    return MetricStats(
        mean_ms=float(np.mean(ms)),
        median_ms=float(np.median(ms)),
        std_ms=float(np.std(ms)),
        percentiles_ms={
            percentile_label(p): float(v) for p, v in zip(percentiles, pcts, strict=True)
        },
    )


@dataclass(frozen=True)
class BenchmarkMetrics:
    """The run's totals and latency statistics. Throughputs per second of `duration_s`."""

    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    request_goodput: float | None
    slo_attainment: float | None
    max_output_tokens_per_s: float
    max_concurrent_requests: int
    stats: dict[str, MetricStats]


def metric_values_s(records: Sequence[RequestRecord], name: str) -> list[float]:
    """The per-request (ITL: per-gap) values of metric `name` over successful requests."""
    ok = [r for r in records if r.success]
    if name == "ttft":
        return [r.ttft_s for r in ok if r.ttft_s is not None]
    if name == "tpot":
        return [r.tpot_s for r in ok if r.tpot_s is not None]
    if name == "itl":
        return [gap for r in ok for gap in r.itl_s]
    if name == "e2el":
        return [r.latency_s for r in ok if r.latency_s is not None]
    raise ValueError(f"unknown metric {name!r}; valid: {METRIC_NAMES}")


def meets_slos(record: RequestRecord, slos_ms: dict[str, float]) -> bool:
    """True if a successful request's TTFT/TPOT/E2EL are each <= its SLO (milliseconds)."""
    if not record.success:
        return False
    values_s = {
        "ttft": record.ttft_s if record.ttft_s is not None else math.inf,
        "tpot": record.tpot_s or 0.0,
        "e2el": record.latency_s if record.latency_s is not None else math.inf,
    }
    return all(values_s[name] * 1000.0 <= slo for name, slo in slos_ms.items())


def peak_output_rate_and_concurrency(records: Sequence[RequestRecord]) -> tuple[float, int]:
    """Peaks over 1 s bins (from the first send) of output tokens and of requests in flight.

    Counts successful requests only; a request is in flight in every bin from its send to its
    end, inclusive. Returns (max output tokens/s, max concurrent requests).
    """
    ok = [r for r in records if r.success and r.start_s is not None and r.end_s is not None]
    if not ok:
        return 0.0, 0
    t0 = min(r.start_s for r in ok)
    num_bins = int(math.ceil(max(r.end_s for r in ok) - t0)) + 1
    tokens = np.zeros(num_bins)
    in_flight = np.zeros(num_bins, dtype=np.int64)
    for r in ok:
        in_flight[int(r.start_s - t0) : int(r.end_s - t0) + 1] += 1
        for t, n in zip(r.chunk_times_s, r.chunk_tokens, strict=True):
            tokens[min(int(r.start_s + t - t0), num_bins - 1)] += n
    return float(tokens.max()), int(in_flight.max())


def compute_metrics(
    records: Sequence[RequestRecord],
    duration_s: float,
    metrics: Sequence[str] = METRIC_NAMES,
    percentiles: Sequence[float] = (90.0, 99.0, 99.9),
    slos_ms: dict[str, float] | None = None,
) -> BenchmarkMetrics:
    """Computes the run's metrics from its records and wall-clock duration (seconds)."""
    ok = [r for r in records if r.success]
    total_in = sum(r.input_len for r in ok)
    total_out = sum(r.output_tokens for r in ok)
    dur = max(duration_s, 1e-9)
    goodput = attainment = None
    if slos_ms:
        good = sum(meets_slos(r, slos_ms) for r in ok)
        goodput = good / dur
        attainment = good / len(records) if records else 0.0
    peak_tokens, peak_concurrency = peak_output_rate_and_concurrency(records)
    return BenchmarkMetrics(
        completed=len(ok),
        failed=len(records) - len(ok),
        duration_s=duration_s,
        total_input_tokens=total_in,
        total_output_tokens=total_out,
        request_throughput=len(ok) / dur,
        output_throughput=total_out / dur,
        total_token_throughput=(total_in + total_out) / dur,
        request_goodput=goodput,
        slo_attainment=attainment,
        max_output_tokens_per_s=peak_tokens,
        max_concurrent_requests=peak_concurrency,
        stats={m: summarize_ms(metric_values_s(records, m), percentiles) for m in metrics},
    )


def error_summary(records: Iterable[RequestRecord], width: int = 120) -> list[tuple[str, int]]:
    """Failed requests grouped by error message (first line, `width` chars), most common first."""
    counts = Counter(
        r.error.splitlines()[0][:width] if r.error else "unknown error"
        for r in records
        if not r.success
    )
    return counts.most_common()


def _bin_counts(
    times_s: Iterable[float], num_bins: int, weights: Iterable[int] | None = None
) -> np.ndarray:
    """Counts (or sums `weights`) per 1 s bin; times outside [0, num_bins) go to the edge bins."""
    idx = np.clip(np.floor(np.fromiter(times_s, np.float64)).astype(np.int64), 0, num_bins - 1)
    w = None if weights is None else np.fromiter(weights, np.float64)
    return np.bincount(idx, weights=w, minlength=num_bins)[:num_bins]


def time_series(
    records: Sequence[RequestRecord],
    samples: Sequence[ServerSample],
    duration_s: float,
    ttft_percentiles: Sequence[float] = (50.0, 90.0, 99.0),
) -> dict[str, list]:
    """Per-second series over [0, duration_s): one entry per 1 s bin of the replay clock.

    Keys: t_s (bin starts), arrivals (scheduled sends), sent, completions, failures,
    output_tokens, ttft_pNN_ms (successful requests by send second; None for empty bins),
    running and waiting (mean over the bin's server samples, summed over instances; None
    without samples).
    """
    n = max(1, int(math.ceil(duration_s)))
    sent = [r for r in records if r.start_s is not None]
    ended = [r for r in records if r.end_s is not None]
    ok = [r for r in records if r.success]
    series: dict[str, list] = {
        "t_s": [float(i) for i in range(n)],
        "arrivals": _bin_counts((r.scheduled_s for r in records), n).astype(int).tolist(),
        "sent": _bin_counts((r.start_s for r in sent), n).astype(int).tolist(),
        "completions": _bin_counts((r.end_s for r in ended if r.success), n).astype(int).tolist(),
        "failures": _bin_counts((r.end_s for r in ended if not r.success), n).astype(int).tolist(),
        "output_tokens": _bin_counts(
            (r.start_s + t for r in sent for t in r.chunk_times_s),
            n,
            (k for r in sent for k in r.chunk_tokens),
        )
        .astype(int)
        .tolist(),
    }
    by_bin: list[list[float]] = [[] for _ in range(n)]
    for r in ok:
        by_bin[min(max(int(r.start_s), 0), n - 1)].append(r.ttft_s * 1000.0)
    for p in ttft_percentiles:
        series[f"ttft_{percentile_label(p)}_ms"] = [
            float(np.percentile(v, p)) if v else None for v in by_bin
        ]
    series["running"] = _sample_means(samples, n, lambda s: sum(i.num_running for i in s.instances))
    series["waiting"] = _sample_means(samples, n, lambda s: sum(i.num_waiting for i in s.instances))
    return series


def _sample_means(
    samples: Sequence[ServerSample], n: int, value: Callable[[ServerSample], float]
) -> list[float | None]:
    """Mean of value(sample) over the samples in each 1 s bin; None for bins without one."""
    sums, counts = [0.0] * n, [0] * n
    for s in samples:
        b = min(max(int(s.t_s), 0), n - 1)
        sums[b] += value(s)
        counts[b] += 1
    return [sums[b] / counts[b] if counts[b] else None for b in range(n)]


def instance_series(samples: Sequence[ServerSample]) -> dict:
    """Columnar server samples: {"t_s": [...], "instances": {id: {field: [...]}}}.

    Per instance: state, kv_usage (fraction of blocks used), kv_blocks_used, num_running,
    num_waiting, num_preemptions; None where a sample lacks the instance.
    """
    fields = (
        "state",
        "kv_usage",
        "kv_blocks_used",
        "num_running",
        "num_waiting",
        "num_preemptions",
    )
    ids = sorted({i.instance_id for s in samples for i in s.instances})
    out: dict = {"t_s": [s.t_s for s in samples], "instances": {}}
    for iid in ids:
        cols: dict[str, list] = {f: [] for f in fields}
        for s in samples:
            inst = next((i for i in s.instances if i.instance_id == iid), None)
            for f in fields:
                cols[f].append(None if inst is None else getattr(inst, f))
        out["instances"][str(iid)] = cols
    return out


def transition_gaps(
    records: Sequence[RequestRecord],
    samples: Sequence[ServerSample],
    margin_s: float = 0.25,
    min_gaps: int = 3,
) -> list[dict]:
    """The token gaps of the requests that decode across each state change the samples saw.

    A state change is a pair of consecutive samples at ``t_a`` and ``t_b`` between which some
    instance's state changed (``normal -> dropping``, ``pipelined -> restoring``, ...). Its
    window is the time the transition parked those instances, when sample ``b`` reports it
    whole (``InstanceInfo.last_pause_unix_s``, begun after ``t_a``: the coordinator's ask
    to park to its last resume, mapped onto the replay clock through the samples' Unix
    times); else ``[t_a, t_b + margin_s]`` (the first steps after a transition belong to
    it), which also holds the normal steps around the transition.
    A request decodes across it when it received a delta before the window and one after.
    Its gap there is its largest gap between deltas that overlaps the window; its TBT the
    median of its gaps that ended before the window (at least ``min_gaps`` of them, else it
    is not counted). This is the drop bench's "largest token gap of a pre-drop request vs
    its normal TBT" (issue #5), measured under the replayed load rather than on an idle
    server. Under load the gap also holds the step in flight when the transition asked the
    engines to park (they park between steps), so ``max_gap_before_ms`` gives the largest
    gap the same requests saw before the window.

    Returns one dict per state change, in time order: ``t_s`` ([t_a, t_b]), ``changes``
    ({instance id: "old->new"}), ``paused_ms`` (the parked window's length; None where the
    sample window was used), ``num_requests`` (counted), ``max_gap_ms``, ``max_gap_x_tbt``
    (the largest ratio of a request's gap to its own TBT), ``median_gap_x_tbt`` and
    ``max_gap_before_ms``; the gap fields are None when no request was counted.
    """
    out = []
    for a, b in zip(samples[:-1], samples[1:], strict=True):
        before = {i.instance_id: i.state for i in a.instances}
        changes = {
            i.instance_id: f"{before[i.instance_id]}->{i.state}"
            for i in b.instances
            if i.instance_id in before and before[i.instance_id] != i.state
        }
        if not changes:
            continue
        paused = _paused_window(a, b, set(changes))
        lo, hi = paused or (a.t_s, b.t_s + margin_s)
        gaps, ratios, before = [], [], []
        for r in records:
            if r.start_s is None or len(r.chunk_times_s) < 2:
                continue
            t = [r.start_s + c for c in r.chunk_times_s]
            if t[0] >= lo or t[-1] <= lo:
                continue
            pairs = list(zip(t[:-1], t[1:], strict=True))
            earlier = [y - x for x, y in pairs if y < lo]
            across = [y - x for x, y in pairs if y > lo and x < hi]
            if len(earlier) < min_gaps or not across:
                continue
            gaps.append(max(across))
            ratios.append(max(across) / float(np.median(earlier)))
            before.append(max(earlier))
        out.append(
            {
                "t_s": [a.t_s, b.t_s],
                "changes": {str(k): v for k, v in sorted(changes.items())},
                "paused_ms": None if paused is None else 1e3 * (paused[1] - paused[0]),
                "num_requests": len(gaps),
                "max_gap_ms": 1e3 * max(gaps) if gaps else None,
                "max_gap_x_tbt": max(ratios) if ratios else None,
                "median_gap_x_tbt": float(np.median(ratios)) if ratios else None,
                "max_gap_before_ms": 1e3 * max(before) if before else None,
            }
        )
    return out


SAMPLE_ANSWER_S = 1.0
"""Longest a GetServerInfo poll takes to be answered (seconds): a transition that ended
after ``b`` was asked for may still show in its answer."""


def _paused_window(
    a: ServerSample, b: ServerSample, changed: set[int]
) -> tuple[float, float] | None:
    """On the replay clock, from the first ask to park to the last resume of the changed
    instances' last parking transition as sample ``b`` reports it; None when ``b`` reports
    none begun after sample ``a`` was asked for and ended (by when ``b`` was answered: at
    most ``SAMPLE_ANSWER_S`` after it was asked for), or a sample has no Unix time."""
    if not a.unix_s or not b.unix_s:
        return None
    pauses = [i.last_pause_unix_s for i in b.instances if i.instance_id in changed]
    if not pauses or any(not (a.unix_s <= s < e < b.unix_s + SAMPLE_ANSWER_S) for s, e in pauses):
        return None
    start, end = min(s for s, _ in pauses), max(e for _, e in pauses)
    return b.t_s - (b.unix_s - start), b.t_s - (b.unix_s - end)
