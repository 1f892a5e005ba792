"""The pipelined-step profiler (workers/step_profiler.py) on CPU: off by default, and with N
(or S:N) it profiles exactly steps [0, N) (or [S, S + N)), logs both tables and writes the
Chrome trace."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from workers import envs
from workers.step_profiler import StepProfiler


def test_off_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUNSERVE_PROFILE_PIPELINE_STEPS", raising=False)
    prof = StepProfiler("stage 0", torch.device("cpu"))
    prof.step(0)
    assert prof.n == 0 and prof._prof is None


@pytest.mark.parametrize("value", ["two", "1:2:3", "-1", "5:"])
def test_rejects_a_bad_step_window(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("KUNSERVE_PROFILE_PIPELINE_STEPS", value)
    with pytest.raises(ValueError, match="KUNSERVE_PROFILE_PIPELINE_STEPS must be N or S:N"):
        envs.profile_pipeline_steps()


def test_a_window_from_a_later_step(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """``S:N`` profiles steps [S, S + N) alone: the trace holds their ops and no other's."""
    monkeypatch.setenv("KUNSERVE_PROFILE_PIPELINE_STEPS", "3:2")
    monkeypatch.setenv("KUNSERVE_PROFILE_DIR", str(tmp_path))
    prof = StepProfiler("stage 0", torch.device("cpu"))
    assert (prof.start, prof.n) == (3, 2)
    x = torch.ones(8, 8)
    for k in range(7):
        prof.step(k)
        assert (prof._prof is not None) == (3 <= k < 5)
        x = torch.mm(x, x) / 8 if 3 <= k < 5 else torch.add(x, 1)
    (trace,) = tmp_path.glob("stage_0_*.json")
    names = {e.get("name") for e in json.loads(trace.read_text())["traceEvents"]}
    assert "aten::mm" in names and "aten::add" not in names


def test_profiles_the_first_steps_and_writes_a_trace(
    monkeypatch: pytest.MonkeyPatch, tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("KUNSERVE_PROFILE_PIPELINE_STEPS", "2")
    monkeypatch.setenv("KUNSERVE_PROFILE_DIR", str(tmp_path))
    prof = StepProfiler("stage 1", torch.device("cpu"))
    x = torch.ones(64, 64)
    with caplog.at_level(logging.INFO, logger="workers.step_profiler"):
        for k in range(4):
            prof.step(k)
            x = torch.mm(x, x) / 64
    assert prof._prof is None
    (trace,) = tmp_path.glob("stage_1_*.json")
    names = {e.get("name") for e in json.loads(trace.read_text())["traceEvents"]}
    assert "aten::mm" in names
    assert "profile of its pipelined steps 0-1" in caplog.text and "aten::mm" in caplog.text
