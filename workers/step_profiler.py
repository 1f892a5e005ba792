"""``torch.profiler`` over a window of a stage's pipelined steps, for finding where a slow step
goes (``KUNSERVE_PROFILE_PIPELINE_STEPS=N`` for the first N, ``=S:N`` for N from step S;
workers/envs.py).

Each stage (the leader's :class:`~workers.pipeline.PipelineRunner` and every
:class:`~workers.pipeline.StageLoop`) owns one :class:`StepProfiler` and calls :meth:`step`
at the start of each of its steps: it starts the profiler before step S and stops it before
step S + N, then logs the ops by host time and by device time (at info) and, with
``KUNSERVE_PROFILE_DIR``, writes a Chrome trace there. Off (N = 0), :meth:`step` costs an
integer addition and two compares.
"""

from __future__ import annotations

import logging
import os
import time

import torch

from workers import envs

logger = logging.getLogger(__name__)

_ROWS = 25
"""Ops per logged table."""


class StepProfiler:
    """Profiles steps ``[start, start + n)`` of one stage (``name`` labels the log and the
    trace); ``n`` None: the window of ``KUNSERVE_PROFILE_PIPELINE_STEPS``."""

    def __init__(
        self, name: str, device: torch.device, n: int | None = None, start: int = 0
    ) -> None:
        self.name = name
        self.device = device
        self.start, self.n = envs.profile_pipeline_steps() if n is None else (start, n)
        self._prof: torch.profiler.profile | None = None

    def step(self, k: int) -> None:
        """Call at the start of step ``k`` (0-based)."""
        end = self.start + self.n
        if (k < self.start or k >= end) and self._prof is None:
            return
        if k == self.start and self._prof is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._prof = torch.profiler.profile(activities=activities)
            self._prof.__enter__()
        elif k >= end:
            self.finish()

    def finish(self) -> None:
        """Stops a running profile and reports it (a no-op when none runs)."""
        prof, self._prof = self._prof, None
        if prof is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        prof.__exit__(None, None, None)
        events = prof.key_averages()
        tables = [f"by host time:\n{events.table(sort_by='self_cpu_time_total', row_limit=_ROWS)}"]
        if self.device.type == "cuda":
            by_device = events.table(sort_by="self_device_time_total", row_limit=_ROWS)
            tables.append(f"by device time:\n{by_device}")
        logger.info("%s: profile of its pipelined steps %d-%d, %s", self.name, self.start,
                    self.start + self.n - 1, "\n".join(tables))  # fmt: skip
        out = envs.profile_dir()
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            stamp = time.strftime("%H%M%S")  # a later drop of the same worker writes beside it
            path = out / f"{self.name.replace(' ', '_')}_{os.getpid()}_{stamp}.json"
            prof.export_chrome_trace(str(path))
            logger.info("%s: Chrome trace in %s", self.name, path)
