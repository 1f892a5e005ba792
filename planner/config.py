"""Frozen, validated configuration of the overload planner (detector, drop plan, restore plan).

Each field's docstring doubles as the CLI help (``coordinator.cli.field_docs``). Defaults are
KunServe's where it has one (reference/kunserve.md §3(a), §3(d), §3(e)); the rest are ours and
say so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class PlannerConfig:
    """When to drop and restore, and how big a drop may be."""

    drop_threshold: float = 0.95
    """Drop when an instance's smoothed KV demand (blocks its running and waiting requests need,
    over its KV capacity) reaches this fraction and its queue needs at least its free blocks
    (KunServe oom_check(95), reference/kunserve.md §3(a))."""
    restore_threshold: float = 0.5
    """Restore a group when its KV demand over the members' normal KV capacity, both smoothed
    and its latest sample, is at most this fraction, its queue is empty and demand is falling
    or flat over window_s (KunServe valley_check(50), reference/kunserve.md §3(d))."""
    sample_interval_s: float = 0.5
    """Seconds between load samples the coordinator feeds the detector (KunServe
    INSTANCE_LOAD_REPORT_INTERVAL, reference/kunserve.md §3(e))."""
    window_s: float = 15.0
    """Seconds of samples over which 'falling' is judged, as the least-squares slope of demand
    (KunServe: a 30-sample window at 0.5 s, reference/kunserve.md §3(a))."""
    smoothing_s: float = 1.0
    """Seconds of samples averaged into the demand level compared with the thresholds (ours;
    KunServe compares the latest sample)."""
    min_dwell_s: float = 1.0
    """A drop or restore condition must hold on every sample of this many seconds before it is
    decided (ours: hysteresis against single-sample spikes)."""
    drop_at_once_demand: float = 1.25
    """Drop on the first sample, with neither smoothing nor dwell, when an instance's KV demand
    reaches this multiple of its capacity and its queue needs at least its free blocks: a
    queue a quarter of the KV beyond full is a burst, not noise around drop_threshold, and
    each sample of dwell adds its length to the TTFT of every request waiting (ours, from the
    2x H200 Azure-code replays in docs/benchmarks.md: the burst's first overloaded sample
    read 1.48 or over 2; at 2.0 the dwell took the first case to the next sample, and the
    prompts queued in that half second had the largest TTFTs, 0.9-1.27 s). Must be at least
    drop_threshold; a large value leaves every drop to the dwell."""
    at_once_check_s: float = 0.05
    """Seconds between checks, between two samples, for a drop at once (drop_at_once_demand)
    on each instance's latest load, which its worker pushes with every step; 0 (or a value
    not below sample_interval_s) checks on the samples only (ours: a burst that filled the KV
    just after a sample waited up to sample_interval_s for its drop, and in a 2x H200
    Azure-code replay the prompts queued in that wait had the run's largest TTFTs,
    0.66-0.94 s; docs/benchmarks.md, session 21). These checks record no sample: smoothing,
    dwell and slope see the samples alone."""
    cooldown_s: float = 10.0
    """Seconds after an instance or group enters normal or pipelined mode before the planner may
    reverse that transition (ours: hysteresis against oscillation); a drop at once
    (drop_at_once_demand) does not wait for it."""
    max_group_size: int = 4
    """Most instances merged into one pipeline group (pipeline stages g)."""
    plan_fill_target: float = 0.9
    """A drop plan covers the demand when the group's KV demand is at most this fraction of its
    post-drop KV capacity (ours: keeps the new group below the drop threshold)."""
    restore_fill_limit: float = 0.8
    """Restore only when the group's live KV is at most this fraction of the members' normal
    KV capacity (KunServe max_restore_memory_ratio, reference/kunserve.md §3(e))."""
    max_tbt_slowdown: float = 1.5
    """Reject a drop plan whose predicted time between tokens exceeds this multiple of the same
    requests' time on unpipelined instances (DESIGN.md §8: P99 TBT within 1.5x)."""
    min_throughput_ratio: float = 0.9
    """Reject a drop plan whose predicted decode tokens/s is below this multiple of the members'
    tokens/s now (ours: admitting the queue must pay for most of the pipeline's overhead)."""
    max_step_fill: float = 0.9
    """Do not drop for an instance whose recent steps fill more than this share of the step
    token budget: it is compute-bound (a prefill burst), so more KV cache would only add
    prefill chunks to every step, lengthening TBT, without more tokens per second (ours: the
    2x H200 Azure-code replay in docs/benchmarks.md). 1 never refuses."""
    max_compute_use: float = 0.6
    """Do not drop for an instance that computes more than this share of its profiled peak
    (tokens per second over the last samples / ``WorkerInfo.prefill_tokens_per_s``): its
    queue waits for compute, not for KV, and a pipeline adds no compute. Ours, from the 2x
    H200 replays in docs/benchmarks.md (session 19): the memory-bound Azure-code burst (x0.5,
    1 GiB of KV per GPU) computed 0.24-0.39 of the peak at its drop decisions, and a guard at
    0.3 delayed its drop 1-3.5 s; the compute-bound window (x1, 2 GiB) computed 0.40-0.43,
    and a drop there now lowers P99 TTFT 1.5x against recompute (with 8,192-token
    micro-batches in session 4 a drop at 0.45 had raised it 1.2x and halved goodput).
    A value above 1 never refuses."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"PlannerConfig.{f.name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"PlannerConfig.{f.name} must be finite, got {value!r}")
        self._check_thresholds()
        self._check_times()
        self._check_plan()

    def _check_thresholds(self) -> None:
        _require(self.drop_threshold > 0, "drop_threshold", "> 0", self.drop_threshold)
        _require(
            0 < self.restore_threshold < self.drop_threshold,
            "restore_threshold",
            f"in (0, drop_threshold={self.drop_threshold})",
            self.restore_threshold,
        )
        _require(
            self.drop_at_once_demand >= self.drop_threshold,
            "drop_at_once_demand",
            f">= drop_threshold ({self.drop_threshold})",
            self.drop_at_once_demand,
        )

    def _check_times(self) -> None:
        dt = self.sample_interval_s
        _require(dt > 0, "sample_interval_s", "> 0", dt)
        _require(self.window_s >= 2 * dt, "window_s", ">= 2 * sample_interval_s", self.window_s)
        _require(
            dt <= self.smoothing_s <= self.window_s,
            "smoothing_s",
            f"in [sample_interval_s ({dt}), window_s ({self.window_s})]",
            self.smoothing_s,
        )
        _require(
            0 <= self.min_dwell_s <= self.window_s,
            "min_dwell_s",
            f"in [0, window_s ({self.window_s})]",
            self.min_dwell_s,
        )
        _require(self.cooldown_s >= 0, "cooldown_s", ">= 0", self.cooldown_s)
        _require(self.at_once_check_s >= 0, "at_once_check_s", ">= 0", self.at_once_check_s)

    def _check_plan(self) -> None:
        _require(
            isinstance(self.max_group_size, int) and self.max_group_size >= 2,
            "max_group_size",
            "an integer >= 2",
            self.max_group_size,
        )
        for name in ("plan_fill_target", "restore_fill_limit"):
            value = getattr(self, name)
            _require(0 < value <= 1, name, "in (0, 1]", value)
        _require(self.max_tbt_slowdown >= 1, "max_tbt_slowdown", ">= 1", self.max_tbt_slowdown)
        _require(0 < self.max_step_fill <= 1, "max_step_fill", "in (0, 1]", self.max_step_fill)
        _require(self.max_compute_use > 0, "max_compute_use", "> 0", self.max_compute_use)
        _require(
            self.min_throughput_ratio > 0,
            "min_throughput_ratio",
            "> 0",
            self.min_throughput_ratio,
        )


def _require(ok: bool, name: str, rule: str, value: object) -> None:
    if not ok:
        raise ValueError(f"PlannerConfig.{name} must be {rule}, got {value!r}")
