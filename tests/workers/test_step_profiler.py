"""The pipelined-step profiler (workers/step_profiler.py) on CPU: off by default, and with N
steps it profiles exactly steps [0, N), logs both tables and writes the Chrome trace."""

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


def test_rejects_a_bad_step_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUNSERVE_PROFILE_PIPELINE_STEPS", "two")
    with pytest.raises(ValueError, match="KUNSERVE_PROFILE_PIPELINE_STEPS"):
        envs.profile_pipeline_steps()


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
    assert "profile of its first 2 pipelined steps" in caplog.text and "aten::mm" in caplog.text
