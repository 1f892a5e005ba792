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
