"""Metric arithmetic against values computed by hand.

Four requests on the replay clock (seconds):
  r0: sent 0.0, deltas at +0.1, +0.3, +0.6 (1 token each), finished at 0.6   -> 3 tokens
  r1: sent 0.5, deltas at +0.2 (1 token), +0.4 (2 tokens), finished at 1.0   -> 3 tokens
  r2: sent 2.0, one delta at +0.5 (1 token), finished at 2.5                 -> 1 token
  r3: sent 2.0, failed (INTERNAL) at 2.1
Run duration: 4.0 s.
  TTFT (ms)  = [100, 200, 500]          ITL (ms) = [200, 300, 200]   (pooled per delta)
  TPOT (ms)  = [250, 150]  (r2 has one token: no TPOT; goodput treats it as 0)
  E2EL (ms)  = [600, 500, 500]
"""

from __future__ import annotations

import dataclasses
import math

import pytest

from client.api_types import Finished, InstanceInfo, ServerTiming, Usage
from client.replay.metrics import (
    compute_metrics,
    error_summary,
    instance_series,
    parse_goodput,
    peak_output_rate_and_concurrency,
    percentile_label,
    summarize_ms,
    time_series,
    transition_gaps,
)
from client.replay.records import RequestRecord, ServerSample


def make_request(
    index: int, start: float, chunks: list[tuple[float, int]], end: float, input_len: int
) -> RequestRecord:
    """A finished request: `chunks` are (seconds after start, tokens)."""
    r = RequestRecord(index, f"r{index}", start, input_len, 8)
    r.mark_sent(start)
    for offset, n in chunks:
        r.add_chunk(start + offset, n, "x")
    total = sum(n for _, n in chunks)
    r.mark_finished(end, Finished("length", Usage(input_len, total), ServerTiming()))
    return r


@pytest.fixture
def records() -> list[RequestRecord]:
    r3 = RequestRecord(3, "r3", 2.0, 40, 8)
    r3.mark_sent(2.0)
    r3.mark_failed(2.1, "INTERNAL: engine fault on this request")
    return [
        make_request(0, 0.0, [(0.1, 1), (0.3, 1), (0.6, 1)], 0.6, input_len=10),
        make_request(1, 0.5, [(0.2, 1), (0.4, 2)], 1.0, input_len=20),
        make_request(2, 2.0, [(0.5, 1)], 2.5, input_len=30),
        r3,
    ]


def test_per_request_values(records: list[RequestRecord]) -> None:
    r0, r1, r2, r3 = records
    assert r0.ttft_s == pytest.approx(0.1) and r0.itl_s == pytest.approx([0.2, 0.3])
    assert r0.tpot_s == pytest.approx(0.25) and r0.latency_s == pytest.approx(0.6)
    assert r1.tpot_s == pytest.approx(0.15) and r1.output_tokens == 3
    assert r2.tpot_s is None and r2.itl_s == []
    assert not r3.success and r3.tpot_s is None


def test_totals_and_throughputs(records: list[RequestRecord]) -> None:
    m = compute_metrics(records, duration_s=4.0)
    assert (m.completed, m.failed) == (3, 1)
    assert (m.total_input_tokens, m.total_output_tokens) == (60, 7)
    assert m.request_throughput == pytest.approx(0.75)
    assert m.output_throughput == pytest.approx(1.75)
    assert m.total_token_throughput == pytest.approx(16.75)
    assert m.request_goodput is None and m.slo_attainment is None


def test_latency_statistics(records: list[RequestRecord]) -> None:
    s = compute_metrics(records, duration_s=4.0).stats
    ttft = s["ttft"]
    assert ttft.mean_ms == pytest.approx(800 / 3)
    assert ttft.median_ms == pytest.approx(200)
    assert ttft.std_ms == pytest.approx(
        math.sqrt(((100 - 800 / 3) ** 2 + (200 - 800 / 3) ** 2 + (500 - 800 / 3) ** 2) / 3)
    )
    # linear interpolation on [100, 200, 500]: rank p/100 * 2
    assert ttft.percentiles_ms == pytest.approx({"p90": 440.0, "p99": 494.0, "p99.9": 499.4})
    assert (s["tpot"].mean_ms, s["tpot"].median_ms, s["tpot"].std_ms) == pytest.approx(
        (200, 200, 50)
    )
    assert s["tpot"].percentiles_ms["p90"] == pytest.approx(240.0)
    assert s["itl"].mean_ms == pytest.approx(700 / 3)
    assert s["itl"].percentiles_ms["p90"] == pytest.approx(280.0)
    assert (s["e2el"].mean_ms, s["e2el"].median_ms) == pytest.approx((1600 / 3, 500))


@pytest.mark.parametrize(
    ("slos", "good"),
    [
        (("ttft:250", "tpot:200"), 1),  # r0 misses TPOT (250), r2 misses TTFT (500)
        (("ttft:500",), 3),  # SLOs are inclusive: r2's 500 ms meets 500
        (("tpot:1", "e2el:500"), 1),  # only r2: one token counts as TPOT 0
    ],
)
def test_goodput_and_slo_attainment(records: list[RequestRecord], slos: tuple, good: int) -> None:
    m = compute_metrics(records, duration_s=4.0, slos_ms=parse_goodput(slos))
    assert m.request_goodput == pytest.approx(good / 4.0)
    assert m.slo_attainment == pytest.approx(good / 4)  # of all 4 requests, failed included


def test_peaks(records: list[RequestRecord]) -> None:
    # second 0: r0's 3 tokens and r1's 3 (at 0.7 and 0.9); r0 and r1 both in flight
    assert peak_output_rate_and_concurrency(records) == (6.0, 2)


def test_empty_metrics_are_zero() -> None:
    stats = summarize_ms([], (99.0,))
    assert (stats.mean_ms, stats.median_ms, stats.std_ms, stats.percentiles_ms) == (
        0,
        0,
        0,
        {"p99": 0},
    )
    m = compute_metrics([], duration_s=1.0)
    assert (m.completed, m.failed, m.max_output_tokens_per_s, m.max_concurrent_requests) == (
        0,
        0,
        0,
        0,
    )


def test_time_series_bins(records: list[RequestRecord]) -> None:
    inst = InstanceInfo(0, "normal", (0,), 2, 1, 10, 5, 0, 0, 0, "cpu", ())
    samples = [ServerSample(0.2, (inst,)), ServerSample(0.7, (inst,)), ServerSample(2.2, ())]
    ts = time_series(records, samples, duration_s=4.0)
    assert ts["t_s"] == [0.0, 1.0, 2.0, 3.0]
    assert ts["arrivals"] == [2, 0, 2, 0]
    assert ts["completions"] == [1, 1, 1, 0] and ts["failures"] == [0, 0, 1, 0]
    assert ts["output_tokens"] == [6, 0, 1, 0]
    assert ts["ttft_p50_ms"] == pytest.approx([150.0, None, 500.0, None])
    assert ts["running"] == [2.0, None, 0.0, None] and ts["waiting"] == [1.0, None, 0.0, None]
    cols = instance_series(samples)
    assert cols["t_s"] == [0.2, 0.7, 2.2]
    assert cols["instances"]["0"]["kv_usage"] == [0.5, 0.5, None]
    assert cols["instances"]["0"]["state"] == ["normal", "normal", None]


def test_error_summary_groups_messages(records: list[RequestRecord]) -> None:
    unsent = RequestRecord(4, "r4", 3.0, 1, 1)
    unsent.mark_failed(3.5, "not sent: the hard cap passed")
    assert error_summary([*records, unsent]) == [
        ("INTERNAL: engine fault on this request", 1),
        ("not sent: the hard cap passed", 1),
    ]


def test_goodput_parsing_and_labels() -> None:
    assert parse_goodput(["ttft:500", "tpot:50.5"]) == {"ttft": 500.0, "tpot": 50.5}
    for bad in ("ttft", "ttfb:1", "ttft:abc", "e2el:0"):
        with pytest.raises(ValueError):
            parse_goodput([bad])
    assert [percentile_label(p) for p in (50, 90.0, 99.9)] == ["p50", "p90", "p99.9"]


def test_transition_gaps_compare_each_requests_gap_across_a_state_change_with_its_tbt() -> None:
    """Samples at 1.0 (normal) and 1.5 (dropping): the window is [1.0, 1.75]. r0 decodes every
    10 ms and then waits 60 ms across it (6x); r1 every 20 ms, 40 ms across (2x), and ends
    inside the window; r2 starts inside the window and r3 ends before it: neither is
    counted."""

    def steady(index: int, start: float, period: float, gap_at: float, gap: float, end: float):
        times, t = [], start
        while t < end:
            times.append(t)
            t += gap if abs(t - gap_at) < period / 2 else period
        r = RequestRecord(index, f"r{index}", start, 10, 8)
        r.mark_sent(start - 0.05)
        for t in times:
            r.add_chunk(t, 1, "x")
        r.mark_finished(end, Finished("length", Usage(10, len(times)), ServerTiming()))
        return r

    records = [
        steady(0, 0.5, 0.010, 1.30, 0.060, 2.0),
        steady(1, 0.5, 0.020, 1.40, 0.040, 1.6),
        steady(2, 1.2, 0.010, 9.0, 0.010, 2.0),
        steady(3, 0.2, 0.010, 9.0, 0.010, 0.9),
    ]

    def sample(t: float, state: str) -> ServerSample:
        inst = InstanceInfo(0, state, (0,), 2, 0, 10, 5, 0, 0, 0, "cpu", ())
        return ServerSample(t, (inst, dataclasses.replace(inst, instance_id=1)))

    samples = [sample(0.5, "normal"), sample(1.0, "normal"), sample(1.5, "dropping")]
    samples.append(sample(2.0, "dropping"))
    (change,) = transition_gaps(records, samples)
    assert change["t_s"] == [1.0, 1.5]
    assert change["changes"] == {"0": "normal->dropping", "1": "normal->dropping"}
    assert change["num_requests"] == 2
    assert change["max_gap_ms"] == pytest.approx(60.0)
    assert change["max_gap_x_tbt"] == pytest.approx(6.0)
    assert change["median_gap_x_tbt"] == pytest.approx(4.0)
    assert change["max_gap_before_ms"] == pytest.approx(20.0)
    assert transition_gaps(records, samples[:2]) == []  # no state change


def test_transition_gaps_use_the_parked_window_the_server_reports() -> None:
    """r0 decodes every 10 ms from 0.2 s, with a 100 ms normal prefill step at 1.1 s and a
    30 ms gap at 1.4 s, where the server reports its drop parked the instances (1.395-1.425 s
    on the replay clock, sent as Unix times 1000 s ahead). The window is the parked one: the
    gap across is 30 ms, not the 100 ms step that the [1.0, 1.75] sample window also holds.
    A pause not yet ended, or begun before the first sample, leaves the sample window."""
    times, t = [], 0.2
    while t < 2.0:
        times.append(t)
        t += 0.100 if abs(t - 1.1) < 0.005 else 0.030 if abs(t - 1.4) < 0.005 else 0.010
    r = RequestRecord(0, "r0", 0.2, 10, 8)
    r.mark_sent(0.15)
    for t in times:
        r.add_chunk(t, 1, "x")
    r.mark_finished(2.0, Finished("length", Usage(10, len(times)), ServerTiming()))

    def samples(pause: tuple[float, float]) -> list[ServerSample]:
        def one(t: float, state: str, paused: tuple[float, float]) -> ServerSample:
            inst = InstanceInfo(0, state, (0,), 2, 0, 10, 5, 0, 0, 0, "cpu", (), paused)
            return ServerSample(t, (inst,), 1000.0 + t)

        return [one(1.0, "normal", (0.0, 0.0)), one(1.5, "pipelined", pause)]

    (change,) = transition_gaps([r], samples((1001.395, 1001.425)))
    assert change["paused_ms"] == pytest.approx(30.0)
    assert change["max_gap_ms"] == pytest.approx(30.0)
    assert change["max_gap_x_tbt"] == pytest.approx(3.0)
    assert change["max_gap_before_ms"] == pytest.approx(100.0)
    for pause in ((1001.395, 0.0), (1000.9, 1001.425)):  # still parked; an older pause
        (change,) = transition_gaps([r], samples(pause))
        assert change["paused_ms"] is None and change["max_gap_ms"] == pytest.approx(100.0)
