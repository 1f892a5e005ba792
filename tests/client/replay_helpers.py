"""Run and check a replay against any server given by (host, port).

The client tests use these with the in-process fake server; the end-to-end tests use them with a
real kunserve server fixture, e.g.:

    result = run_burst_replay(server.host, server.port, tmp_path, time_scale=10.0)
    doc = check_replay_result(result)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from client.replay import ReplayConfig, ReplayResult, run_replay

BURST_START_S = 826.0
"""Window start (trace seconds) of a 60 s window of the Azure code trace around its burst."""
BURST_DURATION_S = 60.0
"""That window's length (trace seconds); it holds 583 requests, 415 of them in [855.8, 865.8)."""


def burst_replay_config(host: str, port: int, out_dir: Path, **overrides: Any) -> ReplayConfig:
    """A replay of the Azure code burst window, writing replay.json and replay.png to out_dir.

    Defaults: 60 s window at 826 s, time_scale 10 (6 s of sending), outputs clipped to 32
    tokens, drain timeout 60 s, no progress bar. Any ReplayConfig field can be overridden.
    """
    settings: dict[str, Any] = {
        "host": host,
        "port": port,
        "trace": "azure-code",
        "start_s": BURST_START_S,
        "duration_s": BURST_DURATION_S,
        "time_scale": 10.0,
        "max_output_len": 32,
        "drain_timeout_s": 60.0,
        "ready_timeout_s": 120.0,
        "save_result": True,
        "result_dir": str(out_dir),
        "result_filename": "replay.json",
        "plot": str(Path(out_dir) / "replay.png"),
        "disable_tqdm": True,
    }
    settings.update(overrides)
    return ReplayConfig(**settings)


def run_burst_replay(host: str, port: int, out_dir: Path, **overrides: Any) -> ReplayResult:
    """Runs `burst_replay_config(...)` in-process and returns its result."""
    return run_replay(burst_replay_config(host, port, out_dir, **overrides))


def check_replay_result(result: ReplayResult) -> dict[str, Any]:
    """Asserts every request is accounted for and the outputs exist; returns the saved JSON.

    Checks: each request finished or failed; completed + failed == requests planned; the
    server counted exactly the planned prompt length of every completed request; the JSON
    agrees with the result and its error summary adds up to `failed`; the PNG is a real image.
    """
    m = result.metrics
    assert result.all_accounted, "some request neither finished nor failed"
    assert m.completed + m.failed == len(result.workload.requests) == len(result.records)
    for record in result.records:
        if record.success:
            assert record.server_prompt_tokens == record.input_len, record.request_id
    assert result.result_path is not None and result.result_path.is_file()
    doc = json.loads(result.result_path.read_text())
    assert (doc["completed"], doc["failed"], doc["num_prompts"]) == (
        m.completed,
        m.failed,
        len(result.records),
    )
    assert sum(e["count"] for e in doc["error_summary"]) == m.failed
    series = doc["time_series"]
    assert {len(v) for v in series.values()} == {len(series["t_s"])}
    assert sum(series["arrivals"]) == len(result.records)
    if result.config.plot:
        assert result.plot_path is not None
        png = result.plot_path.read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    return doc
