"""Trace parsers on the shipped files, shaping, and `--describe`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from client.replay.cli import replay_main
from client.replay.config import ReplayConfig
from client.replay.describe import busiest_windows, summarize_trace
from client.replay.traces import (
    NAMED_TRACES,
    Trace,
    TraceRecord,
    gamma_arrivals,
    load_trace,
)
from client.replay.workload import build_workload, clip_lengths, scale_load, select_window


@pytest.fixture(scope="module")
def azure_code() -> Trace:
    return load_trace("azure-code")


def test_shipped_files_exist_with_licences() -> None:
    data = next(iter(NAMED_TRACES.values())).parents[1]
    for rel in (
        "README.md",
        "azure_llm_2023/LICENSE-CC-BY-4.0.txt",
        "azure_llm_2023/AzureLLMInferenceDataset2023.md",
        "mooncake_fast25/LICENSE-APACHE.txt",
        "mooncake_fast25/FAST25-release-README.md",
        "prompts/sharegpt_v3_first_turn3000.jsonl.gz",
    ):
        assert (data / rel).is_file(), rel
    assert all(p.is_file() for p in NAMED_TRACES.values())


def test_azure_code_rows_and_time_range(azure_code: Trace) -> None:
    assert len(azure_code.records) == 8819 and azure_code.num_skipped == 0
    assert azure_code.records[0] == TraceRecord(0.0, 4808, 10)
    assert azure_code.records[1].arrival_s == pytest.approx(0.052)
    # 18:17:03.9799600 -> last row, 57 min 15.9 s later
    assert azure_code.span_s == pytest.approx(3435.948056, abs=1e-6)


def test_azure_conv_rows_and_time_range() -> None:
    trace = load_trace("azure-conv")
    assert len(trace.records) == 19366
    assert trace.records[0].input_len == 374 and trace.records[0].output_len == 44
    assert trace.span_s == pytest.approx(3501.72, abs=0.01)
    assert max(r.output_len for r in trace.records) == 1000


def test_mooncake_rows_units_and_hash_ids() -> None:
    trace = load_trace("mooncake-conv")
    assert len(trace.records) == 12031
    first = trace.records[0]
    assert (first.arrival_s, first.input_len, first.output_len) == (0.0, 6758, 500)
    assert first.hash_ids == tuple(range(14))
    assert trace.span_s == pytest.approx(3536.999)  # timestamps are milliseconds
    assert max(r.input_len for r in trace.records) == 126195


def test_burstgpt_csv_by_header_name_with_filters(tmp_path: Path) -> None:
    path = tmp_path / "burst.csv"
    path.write_text(
        "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
        "105,ChatGPT,472,18,490,Conversation log\n"
        "100,GPT-4,1000,0,1000,Conversation log\n"
        "102.5,GPT-4,30,70,100,API log\n"
        "101,ChatGPT,12,34,46,Conversation log\n"
    )
    all_rows = load_trace(str(path))
    assert [(r.arrival_s, r.input_len, r.output_len) for r in all_rows.records] == [
        (0.0, 12, 34),
        (1.5, 30, 70),
        (4.0, 472, 18),
    ]
    assert all_rows.num_skipped == 1  # the failed request with 0 response tokens
    chat = load_trace(str(path), burstgpt_model="ChatGPT", burstgpt_log_type="Conversation log")
    assert [r.input_len for r in chat.records] == [12, 472]


def test_unknown_format_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="unknown trace format"):
        load_trace(str(bad))
    with pytest.raises(FileNotFoundError, match="azure-code"):
        load_trace("no-such-trace")


def test_busiest_window_is_the_azure_code_burst(azure_code: Trace) -> None:
    (start, count), *_ = busiest_windows(azure_code.arrivals_s, 10.0, 3)
    assert start == pytest.approx(855.79, abs=0.01) and count == 415
    summary = summarize_trace(azure_code, width_s=10.0, top_k=3)
    assert summary.busiest[0].rate == pytest.approx(41.5)
    assert all(abs(w.start_s - start) >= 10.0 for w in summary.busiest[1:])
    assert summary.per_second_rate["max"] == 67 and summary.per_second_rate["p50"] == 0


def test_describe_cli_prints_burst_without_server(capsys: pytest.CaptureFixture[str]) -> None:
    # Port 9 (discard) on a TEST-NET address: a connection attempt would hang or fail.
    argv = ["--describe", "--trace", "azure-code", "--host", "192.0.2.1", "--port", "9"]
    assert replay_main(argv) == 0
    out = capsys.readouterr().out
    assert "1. t=   855.8    415" in out
    assert "Trace azure-code: 8819 requests" in out


def test_window_time_scale_and_prompt_cap(azure_code: Trace) -> None:
    cfg = ReplayConfig(start_s=855.0, duration_s=10.0, time_scale=5.0, num_prompts=100)
    w = build_workload(azure_code, cfg)
    window = select_window(azure_code, 855.0, 10.0)
    assert w.num_traced_in_window == len(window) == 391
    assert all(855.0 <= r.arrival_s < 865.0 for r in window)
    assert len(w.requests) == 100
    assert [r.trace_arrival_s for r in w.requests] == [r.arrival_s for r in window[:100]]
    assert w.requests[0].send_s == pytest.approx((window[0].arrival_s - 855.0) / 5.0)
    assert w.span_s <= 10.0 / 5.0


def test_load_scale_replicates_like_kunserve() -> None:
    records = [TraceRecord(float(i), 10, 5) for i in range(1000)]
    rng = np.random.default_rng(0)
    assert scale_load(records, 1.0, rng) == records
    doubled = scale_load(records, 2.0, rng)
    assert len(doubled) == 2000 and doubled[0] == doubled[1] == records[0]
    assert 450 < len(scale_load(records, 0.5, rng)) < 550
    assert 2400 < len(scale_load(records, 2.5, rng)) < 2600


def test_clip_lengths_respects_limits_and_context() -> None:
    assert clip_lengths(100, 20, None, None, None) == (100, 20)
    assert clip_lengths(4808, 10, None, None, 512) == (502, 10)
    assert clip_lengths(4808, 10, 300, 4, 512) == (300, 4)
    assert clip_lengths(10, 900, None, None, 512) == (1, 511)


def test_clipping_is_counted(azure_code: Trace) -> None:
    cfg = ReplayConfig(start_s=850.0, duration_s=10.0, max_output_len=16)
    w = build_workload(azure_code, cfg, max_model_len=512)
    assert all(r.input_len + r.output_len <= 512 for r in w.requests)
    assert w.num_clipped_input == sum(r.traced_input_len > 512 - r.output_len for r in w.requests)
    assert w.num_clipped_output == sum(r.traced_output_len > 16 for r in w.requests)
    assert 0 < w.num_clipped <= len(w.requests)


def test_gamma_arrivals_mean_rate_is_exact() -> None:
    rng = np.random.default_rng(1)
    poisson = gamma_arrivals(500, 10.0, 1.0, rng)
    bursty = gamma_arrivals(500, 10.0, 0.2, rng)
    assert poisson[-1] == pytest.approx(50.0) and bursty[-1] == pytest.approx(50.0)
    assert np.all(np.diff(poisson) >= 0)
    assert np.std(np.diff(bursty)) > 1.5 * np.std(np.diff(poisson))
    assert np.all(gamma_arrivals(3, float("inf"), 1.0, rng) == 0.0)


def test_synthetic_trace_from_config() -> None:
    from client.replay.workload import load_configured_trace

    cfg = ReplayConfig(
        trace="synthetic", request_rate=4.0, num_prompts=40, lengths_from="azure-conv"
    )
    trace = load_configured_trace(cfg)
    assert len(trace.records) == 40
    assert trace.records[-1].arrival_s == pytest.approx(10.0)
    with pytest.raises(ValueError, match="tokenizer"):
        load_configured_trace(ReplayConfig(trace="synthetic", lengths_from="sharegpt"))


def test_config_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match="time_scale"):
        ReplayConfig(time_scale=0)
    with pytest.raises(ValueError, match="goodput"):
        ReplayConfig(goodput=("ttfb:100",))
    with pytest.raises(ValueError, match="percentile_metrics"):
        ReplayConfig(percentile_metrics=("ttft", "latency"))
