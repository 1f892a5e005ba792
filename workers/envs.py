"""Every environment variable kunserve reads, in one place, each behind a typed accessor.

Other modules call these functions and never read ``os.environ`` themselves. All names carry
the ``KUNSERVE_`` prefix.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``KUNSERVE_CACHE_DIR``: where converted checkpoints and downloads are kept.

    Default ``~/.cache/kunserve``; an empty value counts as unset; ``~`` is expanded.
    """
    value = os.environ.get("KUNSERVE_CACHE_DIR", "")
    return Path(value).expanduser() if value else Path.home() / ".cache" / "kunserve"


def sync_step_phases() -> bool:
    """``KUNSERVE_SYNC_STEP_PHASES``: ``1`` times the phases of the first pipelined steps after
    a drop (logged at info) after a device sync each, so each phase owns its GPU work. The
    syncs stall the pipeline, so the default (unset, ``0``) times host work only."""
    return os.environ.get("KUNSERVE_SYNC_STEP_PHASES", "0") == "1"


def profile_pipeline_steps() -> tuple[int, int]:
    """``KUNSERVE_PROFILE_PIPELINE_STEPS``: profile N pipelined steps of every stage after a
    drop with ``torch.profiler`` (workers/step_profiler.py): ``N`` the first N, ``S:N`` the
    N from step S on (0-based; the steady state, past the drop's first steps). Returns
    (S, N); default (0, 0), off. Raises ValueError for anything but non-negative integers
    in those forms."""
    value = os.environ.get("KUNSERVE_PROFILE_PIPELINE_STEPS", "") or "0"
    parts = value.split(":")
    if len(parts) > 2 or not all(p.isdigit() for p in parts):
        raise ValueError(
            f"KUNSERVE_PROFILE_PIPELINE_STEPS must be N or S:N (integers >= 0), got {value!r}"
        )
    return (0, int(parts[0])) if len(parts) == 1 else (int(parts[0]), int(parts[1]))


def stage_trace_dir() -> Path | None:
    """``KUNSERVE_STAGE_TRACE_DIR``: where each pipeline stage writes, when its pipeline
    stops, one JSON row per micro-batch it computed (tokens, compute time, the idle time
    before it by part; ``ComputeTimeline.rows``). A diagnostic: the rows stay in memory
    until the pipeline stops (about 200 bytes each). Unset or empty writes none."""
    value = os.environ.get("KUNSERVE_STAGE_TRACE_DIR", "")
    return Path(value).expanduser() if value else None


def profile_dir() -> Path | None:
    """``KUNSERVE_PROFILE_DIR``: where ``KUNSERVE_PROFILE_PIPELINE_STEPS`` writes Chrome
    traces; unset or empty writes none (the op tables go to the log either way)."""
    value = os.environ.get("KUNSERVE_PROFILE_DIR", "")
    return Path(value).expanduser() if value else None
