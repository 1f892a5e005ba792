"""run_replay and `kunserve replay` against the in-process fake server."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from client.replay import ReplayConfig, run_replay
from client.replay.cli import replay_main
from tests.client.fake_server import FakeServer
from tests.client.replay_helpers import check_replay_result, run_burst_replay


def test_burst_window_all_accounted_with_exact_lengths(
    fake_server: FakeServer, tmp_path: Path
) -> None:
    fake_server.state.token_delay_s = 0.001
    result = run_burst_replay(
        fake_server.host,
        fake_server.port,
        tmp_path,
        start_s=846.0,
        duration_s=20.0,
        time_scale=20.0,
        max_output_len=8,
        goodput=("ttft:1000",),
        save_detailed=True,
    )
    doc = check_replay_result(result)
    assert len(result.records) == 475 and result.metrics.completed == 475
    sent = {r.request_id: r for r in fake_server.state.requests}
    for planned, record in zip(result.workload.requests, result.records, strict=True):
        req = sent[record.request_id]
        assert len(req.token_ids.ids) == planned.input_len and req.token_ids.ids[0] == 1
        assert req.sampling_params.max_tokens == planned.output_len <= 8
        assert req.sampling_params.ignore_eos and req.sampling_params.temperature == 0.0
        assert planned.input_len + planned.output_len <= 512
        assert record.output_tokens == planned.output_len
    assert doc["num_clipped"] == result.workload.num_clipped > 400  # most inputs exceed 512
    assert doc["trace_window"] == [846.0, 866.0] and doc["time_scale"] == 20.0
    assert len(doc["ttfts"]) == 475 and doc["request_goodput"] is not None
    assert doc["server_samples"]["instances"].keys() == {"0", "1"}
    assert result.duration_s < 20.0 / 20.0 + 5.0


def test_drain_timeout_aborts_and_counts_failed(fake_server: FakeServer, tmp_path: Path) -> None:
    fake_server.state.hang_all = True
    t0 = time.monotonic()
    result = run_burst_replay(
        fake_server.host,
        fake_server.port,
        tmp_path,
        num_prompts=5,
        time_scale=100.0,
        drain_timeout_s=0.3,
    )
    assert time.monotonic() - t0 < 5.0
    doc = check_replay_result(result)
    assert (result.metrics.completed, result.metrics.failed, result.num_aborted_at_cap) == (0, 5, 5)
    assert doc["error_summary"][0]["error"].startswith("ABORTED: still running at the hard cap")
    ids = {r.request_id for r in result.records}
    deadline = time.monotonic() + 5
    while not ids <= fake_server.state.cancelled | fake_server.state.aborted:
        assert time.monotonic() < deadline, "the server never saw the aborts"
        time.sleep(0.01)


def test_max_concurrency_and_server_errors(fake_server: FakeServer, tmp_path: Path) -> None:
    fake_server.state.token_delay_s = 0.005
    fake_server.state.fail_every = 4
    result = run_burst_replay(
        fake_server.host,
        fake_server.port,
        tmp_path,
        num_prompts=12,
        time_scale=1000.0,
        max_concurrency=2,
        max_output_len=4,
        plot=None,
    )
    check_replay_result(result)
    assert fake_server.state.max_live == 2
    spans = [(r.start_s, r.end_s) for r in result.records]
    assert max(sum(s <= t < e for s, e in spans) for t, _ in spans) == 2
    assert (result.metrics.completed, result.metrics.failed) == (9, 3)
    assert [r.error for r in result.records if not r.success] == [
        "INTERNAL: engine fault on this request"
    ] * 3


def test_synthetic_sharegpt_lengths_with_server_tokenizer(fake_server: FakeServer) -> None:
    config = ReplayConfig(
        host=fake_server.host,
        port=fake_server.port,
        trace="synthetic",
        lengths_from="sharegpt",
        num_prompts=20,
        request_rate=200.0,
        max_output_len=3,
        disable_tqdm=True,
    )
    result = run_replay(config)
    assert result.metrics.completed == 20 and result.all_accounted
    assert result.workload.span_s == 0.1  # 20 requests at 200 req/s
    assert all(r.output_tokens <= 3 for r in result.records)


def test_replay_cli_writes_table_json_and_plot(
    fake_server: FakeServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run" / "result.json"
    argv = [
        "--host", fake_server.host, "--port", str(fake_server.port),
        "--trace", "mooncake-conv", "--num-prompts", "8", "--time-scale", "1000",
        "--max-output-len", "4", "--save-result", str(out), "--plot", str(tmp_path / "t.png"),
        "--goodput", "ttft:2000", "tpot:100", "--metric-percentiles", "50,99", "--disable-tqdm",
    ]  # fmt: skip
    assert replay_main(argv) == 0
    text = capsys.readouterr().out
    assert "Serving Benchmark Result" in text and "Successful requests:" in text
    assert "P50 TTFT (ms):" in text and "SLO attainment (%):" in text
    doc = json.loads(out.read_text())
    assert doc["completed"] == 8 and "p50_ttft_ms" in doc and "p99_itl_ms" in doc
    assert "p90_ttft_ms" not in doc and doc["trace"] == "mooncake-conv"
    assert (tmp_path / "t.png").stat().st_size > 10_000


def test_replay_cli_fails_cleanly_without_server(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--port", "1", "--ready-timeout", "0.3", "--num-prompts", "1", "--disable-tqdm"]
    assert replay_main(argv) == 1
    assert "DEADLINE_EXCEEDED" in capsys.readouterr().err


def test_empty_window_is_an_input_error(
    fake_server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--port", str(fake_server.port), "--start", "830", "--duration", "10"]
    assert replay_main([*argv, "--disable-tqdm"]) == 2
    assert "[830, 840) s of azure-code holds no requests" in capsys.readouterr().err
    assert fake_server.state.requests == []


def test_client_stall_is_recorded_and_reported(
    fake_server: FakeServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that blocks its own event loop (here: one prompt taking 0.4 s to build) must
    say so, since every stream it reads looks slow meanwhile."""
    from client.replay import runner
    from client.replay.report import format_table

    make = runner.make_prompt_source

    def slow_source(*args, **kwargs):
        prompts = make(*args, **kwargs)

        def prompt_ids(index: int) -> list[int]:
            if index == 3:
                time.sleep(0.4)
            return prompts(index)

        return prompt_ids

    monkeypatch.setattr(runner, "make_prompt_source", slow_source)
    result = run_burst_replay(
        fake_server.host, fake_server.port, tmp_path, num_prompts=8, time_scale=100.0
    )
    doc = check_replay_result(result)
    assert max(late for _, late in result.client_stalls) >= 0.3
    assert doc["client_stalls"]["count"] == len(result.client_stalls) >= 1
    assert doc["client_stalls"]["max_ms"] >= 300
    assert "Client stalls (event loop late):" in format_table(result)
