"""Overload detection: when an instance should drop and when a group should restore.

KunServe's rules (reference/kunserve.md §3(a), §3(d), §3(e)): every 0.5 s each instance reports
its KV demand (blocks its running and waiting requests need, over its capacity); an instance
votes to drop when demand >= 95% and its queue needs at least its free blocks; a group votes to
restore when its queue is empty, demand <= 50% and demand is falling over a 30-sample window.

Ours on top, so that a noisy plateau near a threshold cannot flip the mode back and forth:
the level compared is a moving average (``smoothing_s``; a restore needs the latest sample,
KunServe's level, below its threshold too), a condition must hold on every sample
of ``min_dwell_s``, a transition cannot be reversed for ``cooldown_s`` after it completes, and
"falling" is the least-squares slope over ``window_s`` rather than two end points. A slope of
exactly 0 (a flat window, e.g. an idle group at demand 0) also counts, or an idle group would
never restore; any noise makes the slope non-zero. The gap between the drop and restore
thresholds is itself a hysteresis band.

One exception: a drop whose unsmoothed demand already reaches ``drop_at_once_demand`` (a queue
a quarter of the KV beyond full) is decided at that sample, as KunServe decides every drop: that
is no plateau, and the dwell would only add to the queue's wait. Nor does it wait for the
cooldown after a restore: the gap between the at-once level and the restore threshold is
hysteresis enough, the restore still waits out its own cooldown after the drop, and a burst
held back by the cooldown queued for seconds in a 2x H200 replay (P99 TTFT 2.1 s against
0.58 s; docs/benchmarks.md, session 21). The same test can be made between samples on the
latest loads (``at_once``, every ``at_once_check_s``), so that a burst arriving just after a
sample need not wait for the next; those checks record no sample.

Windows count samples: a span of X seconds is the last round(X / sample_interval_s) samples.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from planner.config import PlannerConfig
from planner.types import InstanceLoad, InstanceState

_GAP_INTERVALS = 4
"""A pause longer than this many sample intervals clears every window (stale samples)."""


class Decision(enum.Enum):
    """What the coordinator should do about one instance or group."""

    NONE = "none"
    DROP = "drop"
    RESTORE = "restore"


@dataclass(frozen=True)
class Verdict:
    """The decision for one normal instance or one group at the latest sample."""

    decision: Decision
    instance_ids: tuple[int, ...]
    """The instance, or the group's members in the order their loads arrived."""
    group_id: int | None
    t: float
    """Time of the sample decided on (seconds, the caller's clock)."""
    demand: float
    """Smoothed KV demand over normal capacity (fraction)."""
    latest_demand: float
    """KV demand over normal capacity at the latest sample, unsmoothed (fraction)."""
    slope_per_s: float
    """Least-squares slope of demand over the window (fraction per second)."""
    reason: str
    dwelling: int = 0
    """With decision NONE: how many samples in a row, up to the latest, already met the
    condition whose dwell has not run out (0: none; 1: the dwell began at this sample)."""


@dataclass(frozen=True)
class _Sample:
    t: float
    demand: float
    smoothed: float
    slope_per_s: float
    num_waiting: int
    overloaded: bool
    valley: bool
    overloaded_at_once: bool = False
    """Demand (unsmoothed) at least ``drop_at_once_demand`` and the queue needs the free
    blocks: a drop needs no dwell."""


_Key = tuple[str, int]


class OverloadDetector:
    """Feed it every instance's load each ``sample_interval_s`` (``observe``); ask ``decide``.

    Normal instances are judged one by one (DROP or NONE); instances sharing a ``group_id`` are
    judged as one group (RESTORE or NONE) from their summed blocks. Instances in a transition
    (dropping, restoring), starting or failed always get NONE. ``decide`` has no side effects:
    a DROP or RESTORE is repeated on every sample while it holds, until the loads show the
    transition; the coordinator acts on it or not.
    """

    def __init__(self, config: PlannerConfig) -> None:
        self.config = config
        self._n_smooth = max(1, round(config.smoothing_s / config.sample_interval_s))
        self._n_window = max(2, round(config.window_s / config.sample_interval_s))
        self._n_dwell = max(1, round(config.min_dwell_s / config.sample_interval_s))
        self._history: dict[_Key, deque[_Sample]] = {}
        self._members: dict[_Key, tuple[int, ...]] = {}
        self._key_state: dict[_Key, InstanceState | None] = {}
        self._state: dict[int, InstanceState] = {}
        self._since: dict[int, float] = {}
        self._last_t: float | None = None

    def observe(self, t: float, loads: Sequence[InstanceLoad]) -> None:
        """Records one sample of every instance at time ``t`` (seconds, increasing).

        Raises ValueError if ``t`` does not increase or an instance appears twice.
        """
        if self._last_t is not None and t <= self._last_t:
            raise ValueError(f"sample time {t} is not after the previous one ({self._last_t})")
        ids = [ld.instance_id for ld in loads]
        if len(set(ids)) != len(ids):
            raise ValueError(f"an instance appears twice in one sample: {sorted(ids)}")
        if (
            self._last_t is not None
            and t - self._last_t > _GAP_INTERVALS * self.config.sample_interval_s
        ):
            self._history.clear()
            self._members.clear()
            self._key_state.clear()
        self._last_t = t
        self._track_transitions(t, loads)
        keyed = _group_by_key(loads)
        for key in set(self._history) - set(keyed):
            del self._history[key], self._members[key], self._key_state[key]
        for key, members in keyed.items():
            self._members[key] = tuple(ld.instance_id for ld in members)
            states = {ld.state for ld in members}
            self._key_state[key] = states.pop() if len(states) == 1 else None
            hist = self._history.setdefault(key, deque(maxlen=self._n_window))
            hist.append(self._sample(t, members, hist))

    def decide(self) -> list[Verdict]:
        """One verdict per normal instance and per group at the latest sample, in key order."""
        return [self._verdict(key, hist) for key, hist in sorted(self._history.items())]

    def at_once(self, t: float, loads: Sequence[InstanceLoad]) -> list[Verdict]:
        """Between samples: a DROP verdict for each normal instance outside any group whose
        load at time ``t`` (seconds, not before the latest sample) is overloaded at once
        (unsmoothed demand >= ``drop_at_once_demand`` and a queue that needs the free
        blocks), in instance order. It records nothing: the windows, smoothing, dwell and
        cooldowns are those of the samples."""
        out = []
        for ld in sorted(loads, key=lambda ld: ld.instance_id):
            if ld.group_id is not None or ld.state is not InstanceState.NORMAL:
                continue
            demand, _, queue_needs_free = _level([ld])
            if not self._overloaded_at_once(demand, queue_needs_free):
                continue
            at = self.config.drop_at_once_demand
            hist = self._history.get(("instance", ld.instance_id))
            out.append(
                Verdict(
                    decision=Decision.DROP,
                    instance_ids=(ld.instance_id,),
                    group_id=None,
                    t=t,
                    demand=hist[-1].smoothed if hist else demand,
                    latest_demand=demand,
                    slope_per_s=hist[-1].slope_per_s if hist else 0.0,
                    reason=f"overloaded at once between samples: demand {demand:.3f} >= {at:g}",
                )
            )
        return out

    # --- internals ---------------------------------------------------------------------------

    def _track_transitions(self, t: float, loads: Iterable[InstanceLoad]) -> None:
        """Remembers when each instance last changed mode (leaving STARTING does not count)."""
        for ld in loads:
            prev = self._state.get(ld.instance_id)
            if prev is not None and prev is not ld.state and prev is not InstanceState.STARTING:
                self._since[ld.instance_id] = t
            self._state[ld.instance_id] = ld.state

    def _sample(self, t: float, members: Sequence[InstanceLoad], hist: deque[_Sample]) -> _Sample:
        cfg = self.config
        demand, waiting, queue_needs_free = _level(members)
        levels = [s.demand for s in _tail(hist, self._n_smooth - 1)] + [demand]
        smoothed = sum(levels) / len(levels)
        slope = _slope([(s.t, s.demand) for s in _tail(hist, self._n_window - 1)] + [(t, demand)])
        return _Sample(
            t=t,
            demand=demand,
            smoothed=smoothed,
            slope_per_s=slope,
            num_waiting=waiting,
            overloaded=smoothed >= cfg.drop_threshold and queue_needs_free,
            valley=waiting == 0 and max(smoothed, demand) <= cfg.restore_threshold and slope <= 0.0,
            overloaded_at_once=self._overloaded_at_once(demand, queue_needs_free),
        )

    def _overloaded_at_once(self, demand: float, queue_needs_free: bool) -> bool:
        """A drop at once (module docstring): unsmoothed demand at ``drop_at_once_demand`` or
        more, and a queue that needs the free blocks."""
        return demand >= self.config.drop_at_once_demand and queue_needs_free

    def _verdict(self, key: _Key, hist: deque[_Sample]) -> Verdict:
        last = hist[-1]
        state = self._key_state[key]
        dwelling = 0
        if state is InstanceState.NORMAL:
            decision, reason, dwelling = self._judge(key, hist, "overloaded", Decision.DROP)
        elif state is InstanceState.PIPELINED:
            decision, reason, dwelling = self._judge(key, hist, "valley", Decision.RESTORE)
        else:
            decision, reason = Decision.NONE, f"state {state.value if state else 'mixed'}"
        return Verdict(
            decision=decision,
            instance_ids=self._members[key],
            group_id=key[1] if key[0] == "group" else None,
            t=last.t,
            demand=last.smoothed,
            latest_demand=last.demand,
            slope_per_s=last.slope_per_s,
            reason=reason,
            dwelling=dwelling,
        )

    def _judge(
        self, key: _Key, hist: deque[_Sample], flag: str, decision: Decision
    ) -> tuple[Decision, str, int]:
        """``decision`` when ``flag`` held on each of the last n_dwell samples and the cooldown
        since the key's last transition has passed, or at once (a drop at once needs
        neither); else NONE with the reason. The third item is ``Verdict.dwelling``."""
        last = hist[-1]
        dwell = _tail(hist, self._n_dwell)
        held = len(dwell) == self._n_dwell and all(getattr(s, flag) for s in dwell)
        at_once = decision is Decision.DROP and last.overloaded_at_once
        if not (held or at_once):
            streak = 0
            for s in reversed(dwell):
                if not getattr(s, flag):
                    break
                streak += 1
            if streak:
                return Decision.NONE, f"{flag} on {streak} of {self._n_dwell} samples", streak
            return Decision.NONE, f"not {flag} for {self._n_dwell} samples", 0
        since = max(self._since.get(i, -math.inf) for i in self._members[key])
        if last.t - since < self.config.cooldown_s and not at_once:  # (module docstring)
            return Decision.NONE, f"{flag}, but in cooldown since t={since:g}", 0
        if not held:
            at = self.config.drop_at_once_demand
            return decision, f"{flag} at once: demand {last.demand:.3f} >= {at:g}", 0
        why = f"{flag} for {self._n_dwell} samples: demand {last.smoothed:.3f}"
        return decision, f"{why} (latest sample {last.demand:.3f})", 0


def _level(members: Sequence[InstanceLoad]) -> tuple[float, int, bool]:
    """The members' summed KV demand over their normal capacity, their waiting requests, and
    whether the queue needs at least the free blocks."""
    total = sum(ld.kv_blocks_total for ld in members)
    demand = sum(ld.kv_demand_blocks for ld in members) / total
    waiting = sum(ld.num_waiting for ld in members)
    free = sum(ld.free_blocks for ld in members)
    return demand, waiting, waiting > 0 and sum(ld.waiting_demand_blocks for ld in members) >= free


def _group_by_key(loads: Iterable[InstanceLoad]) -> dict[_Key, list[InstanceLoad]]:
    """A group's members share one key; any other instance has its own."""
    keyed: dict[_Key, list[InstanceLoad]] = {}
    for ld in loads:
        key = ("group", ld.group_id) if ld.group_id is not None else ("instance", ld.instance_id)
        keyed.setdefault(key, []).append(ld)
    return keyed


def _tail(hist: deque[_Sample], n: int) -> list[_Sample]:
    """The last ``n`` samples (fewer if the history is shorter; none for n <= 0)."""
    return list(hist)[max(0, len(hist) - n) :] if n > 0 else []


def _slope(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope dy/dt of (t, y) points; 0.0 for fewer than two."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    cov = sum((t - mean_t) * (y - mean_y) for t, y in points)
    return cov / var if var > 0 else 0.0
