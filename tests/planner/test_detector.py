"""The detector's decisions on recorded demand series, driven through a stand-in control loop.

The loop plays the coordinator: every 0.5 s it builds each instance's load from a demand
series, feeds the detector, and applies a DROP (``plan_drop``) or RESTORE (``plan_restore``)
at once, so the next sample shows the new mode.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from planner.config import PlannerConfig
from planner.cost_model import CostModel
from planner.detector import Decision, OverloadDetector, Verdict
from planner.drop_plan import plan_drop, plan_restore
from planner.types import Group, InstanceLoad, InstanceState, ModelShape

N = 25_600
"""Blocks per instance (Llama-3-8B, 50 GiB of KV)."""
RB = 128
"""Blocks per request (2k tokens)."""
WATERMARK = 0.05
"""The engine admits requests up to 95% of its blocks and keeps the rest allocated ahead for
running requests' next tokens, so at high load its queue needs more than its free blocks."""

Series = Callable[[float], dict[int, float]]


@dataclass
class ControlLoop:
    """Stand-in for the coordinator's 0.5 s control loop over two or more instances."""

    shape: ModelShape
    cost_model: CostModel
    config: PlannerConfig = field(default_factory=PlannerConfig)
    extra_waiting: Callable[[float], int] = lambda t: 0
    """Requests queued on instance 0 (the leader when grouped) on top of the series' demand."""
    groups: dict[int, Group] = field(default_factory=dict)
    events: list[tuple[float, Decision, tuple[int, ...]]] = field(default_factory=list)
    verdicts: list[Verdict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.detector = OverloadDetector(self.config)

    def run(self, series: Series, until_s: float) -> list[tuple[float, Decision, tuple[int, ...]]]:
        dt = self.config.sample_interval_s
        for i in range(1, round(until_s / dt) + 1):
            self.step(i * dt, series(i * dt))
        return self.events

    def step(self, t: float, demand: dict[int, float]) -> None:
        loads = self.loads(t, demand)
        self.detector.observe(t, loads)
        for verdict in self.detector.decide():
            self.verdicts.append(verdict)
            if verdict.decision is Decision.DROP:
                self._drop(t, loads, verdict)
            elif verdict.decision is Decision.RESTORE:
                self._restore(t, loads, verdict)

    def loads(self, t: float, demand: dict[int, float]) -> list[InstanceLoad]:
        grouped = {i for grp in self.groups.values() for i in grp.instance_ids}
        loads = [
            _load(i, round(d * N) + self._queued(t, i), N, self._queued(t, i) // RB)
            for i, d in sorted(demand.items())
            if i not in grouped
        ]
        for gid, grp in self.groups.items():
            need = sum(round(demand[i] * N) for i in grp.instance_ids) + self._queued(t, 0)
            leader = _load(grp.leader, need, grp.capacity_after_blocks, self._queued(t, 0) // RB)
            for stage, (i, rng) in enumerate(
                zip(grp.instance_ids, grp.stage_layer_ranges, strict=True)
            ):
                base = leader if stage == 0 else InstanceLoad(i, N, 0, 0)
                loads.append(_pipelined(base, N, rng, gid))
        return loads

    def _queued(self, t: float, i: int) -> int:
        return self.extra_waiting(t) * RB if i == 0 else 0

    def _drop(self, t: float, loads: list[InstanceLoad], verdict: Verdict) -> None:
        plan = plan_drop(loads, self.shape, self.cost_model, self.config, verdict.instance_ids)
        for grp in plan.groups if plan else ():
            self.groups[max(self.groups, default=-1) + 1] = grp
            self.events.append((t, Decision.DROP, grp.instance_ids))

    def _restore(self, t: float, loads: list[InstanceLoad], verdict: Verdict) -> None:
        members = [ld for ld in loads if ld.group_id == verdict.group_id]
        assert sum(ld.num_waiting for ld in members) == 0, f"RESTORE at {t} with a queue"
        if plan_restore(members, self.shape, self.config) is not None:
            self.events.append(
                (t, Decision.RESTORE, self.groups.pop(verdict.group_id).instance_ids)
            )


def _load(i: int, need: int, capacity: int, queued_requests: int) -> InstanceLoad:
    """The engine's load report with ``need`` blocks of demand (see WATERMARK)."""
    running = min(need, int((1 - WATERMARK) * capacity))
    waiting = need - running
    return InstanceLoad(
        instance_id=i,
        kv_blocks_total=capacity,
        kv_blocks_used=min(capacity, running + int(WATERMARK * capacity)) if running else 0,
        kv_demand_blocks=need,
        num_waiting=max(queued_requests, -(-waiting // RB)),
        waiting_demand_blocks=waiting,
        num_running=running // RB,
    )


def _pipelined(ld: InstanceLoad, normal: int, rng: tuple[int, int], gid: int) -> InstanceLoad:
    """A member's report: its normal capacity, the group's demand on the leader only."""
    return InstanceLoad(
        instance_id=ld.instance_id,
        kv_blocks_total=normal,
        kv_blocks_used=ld.kv_blocks_used,
        kv_demand_blocks=ld.kv_demand_blocks,
        num_waiting=ld.num_waiting,
        waiting_demand_blocks=ld.waiting_demand_blocks,
        num_running=ld.num_running,
        state=InstanceState.PIPELINED,
        layer_range=rng,
        group_id=gid,
    )


def azure_code_burst(t: float) -> dict[int, float]:
    """Instance 0 sees the Azure code trace's burst shape: 0.4 of its KV until 10 s, a ramp to
    1.1 by 15 s, a plateau to 35 s, a decay to 0.2 by 55 s. Instance 1 stays at 0.3."""
    if t <= 10:
        d = 0.4
    elif t <= 15:
        d = 0.4 + 0.14 * (t - 10)
    elif t <= 35:
        d = 1.1
    elif t <= 55:
        d = 1.1 - 0.045 * (t - 35)
    else:
        d = 0.2
    return {0: d, 1: 0.3}


@pytest.fixture
def loop(llama3_8b: ModelShape, cost_model: CostModel) -> ControlLoop:
    return ControlLoop(llama3_8b, cost_model)


def test_burst_drops_once_and_restores_once(loop: ControlLoop) -> None:
    """Ramp samples 14.0 (0.96), 14.5 (1.03): the 1 s average first reaches 0.95 at 14.5 and
    holds at 15.0 (2-sample dwell). The group's demand (d0 + 0.3) / 2 averages 0.492 at 44.5
    and holds at 45.0, 29.5 s after the group formed, with the queue empty and demand falling."""
    events = loop.run(azure_code_burst, until_s=80)
    assert events == [(15.0, Decision.DROP, (0, 1)), (45.0, Decision.RESTORE, (0, 1))]
    drop = next(v for v in loop.verdicts if v.decision is Decision.DROP)
    assert drop.instance_ids == (0,) and drop.group_id is None
    assert drop.demand == pytest.approx((1.03 + 1.1) / 2, abs=1e-4)
    restore = next(v for v in loop.verdicts if v.decision is Decision.RESTORE)
    assert restore.group_id == 0 and restore.slope_per_s < 0
    assert restore.demand == pytest.approx((0.48625 + 0.475) / 2, abs=1e-4)


def test_no_restore_while_the_queue_is_not_empty(loop: ControlLoop) -> None:
    """One request stays queued on the leader until 50 s (say, a prompt waiting for a chunk):
    demand is low and falling from 44.5 on, yet RESTORE waits for two empty-queue samples."""
    loop.extra_waiting = lambda t: 1 if t < 50 else 0
    events = loop.run(azure_code_burst, until_s=80)
    assert events == [(15.0, Decision.DROP, (0, 1)), (50.5, Decision.RESTORE, (0, 1))]


@pytest.mark.parametrize("seed", range(10))
def test_noisy_plateau_at_the_drop_threshold_transitions_at_most_once(
    loop: ControlLoop, seed: int
) -> None:
    """60 s at 0.95 +- 0.03: the queue needs the free blocks whenever a sample is above 0.95,
    so the drop condition flickers; at most one drop, never a restore (the group sits at
    (0.95 + 0.3) / 2, far above 0.5)."""
    rng = random.Random(seed)
    events = loop.run(lambda t: {0: 0.95 + rng.uniform(-0.03, 0.03), 1: 0.3}, until_s=60)
    assert len(events) <= 1
    assert all(decision is Decision.DROP for _, decision, _ in events)


@pytest.mark.parametrize("seed", range(10))
def test_noisy_plateau_at_the_restore_threshold_transitions_at_most_once(
    loop: ControlLoop, seed: int
) -> None:
    """A burst drops the pair; then the group hovers at 0.5 +- 0.03 (slope flipping sign) for
    60 s: at most one restore, and the instances it leaves at ~0.5 never drop again."""
    rng = random.Random(seed)

    def series(t: float) -> dict[int, float]:
        if t <= 12:
            return {0: 1.2 if t >= 10 else 0.4, 1: 0.3}
        d = 0.5 + rng.uniform(-0.03, 0.03)
        return {0: d, 1: d}

    events = loop.run(series, until_s=72)
    assert events[0] == (11.0, Decision.DROP, (0, 1))
    assert len(events) <= 2
    assert all(decision is Decision.RESTORE for _, decision, _ in events[1:])


def square_wave(t: float) -> dict[int, float]:
    """Instance 0 alternates 3 s at 1.15 and 3 s at 0.1; instance 1 stays at 0.1."""
    return {0: 1.15 if int(t // 3) % 2 else 0.1, 1: 0.1}


def test_fast_swings_are_held_apart_by_the_cooldown(
    llama3_8b: ModelShape, cost_model: CostModel
) -> None:
    events = ControlLoop(llama3_8b, cost_model).run(square_wave, until_s=120)
    times = [t for t, _, _ in events]
    assert len(events) >= 2
    assert all(b - a >= 10.0 for a, b in zip(times, times[1:], strict=False))
    kinds = [decision for _, decision, _ in events]
    assert (
        kinds
        == [Decision.DROP, Decision.RESTORE] * (len(kinds) // 2) + kinds[len(kinds) // 2 * 2 :]
    )


def test_without_hysteresis_the_same_swings_oscillate(
    llama3_8b: ModelShape, cost_model: CostModel
) -> None:
    """The control: no smoothing, dwell or cooldown makes the mode follow every swing."""
    bare = PlannerConfig(smoothing_s=0.5, min_dwell_s=0.5, cooldown_s=0.0)
    events = ControlLoop(llama3_8b, cost_model, bare).run(square_wave, until_s=120)
    hysteresis = ControlLoop(llama3_8b, cost_model).run(square_wave, until_s=120)
    assert len(events) > 2 * len(hysteresis)


def test_a_single_spike_does_not_drop(loop: ControlLoop) -> None:
    """Below drop_at_once_demand (1.25) the dwell absorbs a one-sample spike."""
    events = loop.run(lambda t: {0: 1.2 if t == 10.0 else 0.5, 1: 0.3}, until_s=30)
    assert events == []


def test_restore_waits_for_the_cooldown(loop: ControlLoop) -> None:
    """Dropped at 11.0 (group from 11.5); demand collapses at 17 s, which alone would restore
    at 18.0; the 10 s cooldown holds it to 21.5."""
    events = loop.run(lambda t: {0: 1.2 if 10 <= t < 17 else 0.1, 1: 0.1}, until_s=40)
    assert events == [(11.0, Decision.DROP, (0, 1)), (21.5, Decision.RESTORE, (0, 1))]


def test_no_restore_while_the_latest_sample_is_above_the_threshold(loop: ControlLoop) -> None:
    """After the burst the group's demand falls to 0.1 and, as the cooldown ends, jumps to 0.8
    for 1.5 s. The level (a 1 s average) reads 0.45 on the jump's first sample and the 15 s
    slope is still negative, yet the demand is rising: restoring there, the group split and
    dropped again half a second later, here as in a 2x H200 replay (docs/benchmarks.md,
    session 22). KunServe's valley check reads the latest sample; ours needs both below
    the threshold."""

    def series(t: float) -> dict[int, float]:
        d = 0.4 if t < 10 else 1.2 if t < 17 else 1.5 if 21.5 <= t < 23 else 0.1
        return {0: d, 1: 0.1}  # the group's demand: their mean

    events = loop.run(series, until_s=30)
    assert events == [(11.0, Decision.DROP, (0, 1)), (23.5, Decision.RESTORE, (0, 1))]
    jump = next(v for v in loop.verdicts if v.t == 21.5)
    assert jump.demand <= 0.5 < jump.latest_demand and jump.slope_per_s < 0
    assert jump.decision is Decision.NONE


def _normal(i: int, demand: int, waiting: int = 0, **kw: object) -> InstanceLoad:
    return InstanceLoad(i, 1000, min(demand, 1000), demand, 1 if waiting else 0, waiting, **kw)


def _member(i: int, demand: int, state: InstanceState = InstanceState.PIPELINED) -> InstanceLoad:
    return InstanceLoad(i, 1000, demand, demand, state=state, layer_range=(0, 1), group_id=3)


def test_an_idle_group_restores_after_the_cooldown() -> None:
    """Demand exactly 0 is flat, not falling; it must still restore."""
    det = OverloadDetector(PlannerConfig())
    decisions = []
    for k in range(1, 26):
        det.observe(k * 0.5, [_member(0, 0), _member(1, 0)])
        decisions.append(det.decide()[0].decision)
    # The group is first seen at 0.5 with no earlier mode: no cooldown applies; dwell is 2.
    assert decisions[:2] == [Decision.NONE, Decision.RESTORE]


def test_transitions_and_startup_get_none() -> None:
    det = OverloadDetector(PlannerConfig())
    for k in range(1, 5):
        det.observe(
            k * 0.5,
            [
                _normal(0, 1200, 200, state=InstanceState.STARTING),
                _member(1, 100, InstanceState.RESTORING),
                _member(2, 100, InstanceState.RESTORING),
            ],
        )
    verdicts = det.decide()
    assert [(v.instance_ids, v.decision) for v in verdicts] == [
        ((1, 2), Decision.NONE),
        ((0,), Decision.NONE),
    ]
    assert verdicts[1].reason == "state starting"
    assert det.decide() == verdicts  # deciding has no side effects


def test_leaving_startup_does_not_start_a_cooldown() -> None:
    det = OverloadDetector(PlannerConfig())
    det.observe(0.5, [_normal(0, 1200, 200, state=InstanceState.STARTING)])
    det.observe(1.0, [_normal(0, 1200, 200)])
    det.observe(1.5, [_normal(0, 1200, 200)])
    assert det.decide()[0].decision is Decision.DROP


def test_a_pause_in_sampling_clears_the_windows() -> None:
    det = OverloadDetector(PlannerConfig())
    det.observe(0.5, [_normal(0, 1200, 200)])
    det.observe(1.0, [_normal(0, 1200, 200)])
    assert det.decide()[0].decision is Decision.DROP
    det.observe(5.0, [_normal(0, 1200, 200)])
    verdict = det.decide()[0]
    assert verdict.decision is Decision.NONE and verdict.reason == "overloaded on 1 of 2 samples"


def test_observe_rejects_bad_samples() -> None:
    det = OverloadDetector(PlannerConfig())
    det.observe(1.0, [_normal(0, 10)])
    with pytest.raises(ValueError, match="is not after"):
        det.observe(1.0, [_normal(0, 10)])
    with pytest.raises(ValueError, match="appears twice"):
        det.observe(1.5, [_normal(0, 10), _normal(0, 10)])


def test_a_queue_a_quarter_of_the_kv_beyond_full_drops_at_the_first_sample(
    loop: ControlLoop,
) -> None:
    """The Azure-code replay's jumps (0.2 to 1.48, or to over 2x the KV, in one sample):
    demand 1.48 at 10.0 drops at 10.0; 1.2 waits for the smoothing and the dwell (11.0)."""
    assert loop.run(lambda t: {0: 1.48 if t >= 10 else 0.2, 1: 0.3}, until_s=12) == [
        (10.0, Decision.DROP, (0, 1))
    ]
    drops = [v for v in loop.verdicts if v.decision is Decision.DROP]
    assert [v.reason for v in drops] == ["overloaded at once: demand 1.480 >= 1.25"]
    dwell = ControlLoop(loop.shape, loop.cost_model)
    assert dwell.run(lambda t: {0: 1.2 if t >= 10 else 0.2, 1: 0.3}, until_s=12) == [
        (11.0, Decision.DROP, (0, 1))
    ]
    # 10.0 averages 0.2 and 1.2 (0.7: not overloaded); 10.5 begins the dwell
    first = [v for v in dwell.verdicts if v.instance_ids == (0,) and v.t in (10.0, 10.5)]
    assert [(v.reason, v.dwelling, v.latest_demand, round(v.demand, 3)) for v in first] == [
        ("not overloaded for 2 samples", 0, 1.2, 0.7),
        ("overloaded on 1 of 2 samples", 1, 1.2, 1.2),
    ]


def test_drop_at_once_does_not_wait_for_the_cooldown(loop: ControlLoop) -> None:
    """A restore at 21.5 (test_restore_waits_for_the_cooldown) and a second surge at 23 s:
    at 3x the KV it drops at once; at 1.2 (below the at-once level) it waits for the cooldown
    since the restore (31.5) and then its dwell. The restore after the second drop still
    waits out its cooldown."""

    def surge(t: float) -> dict[int, float]:
        return {0: 1.2 if 10 <= t < 17 else (3.0 if 23 <= t < 25 else 0.1), 1: 0.1}

    events = loop.run(surge, until_s=40)
    assert events == [
        (11.0, Decision.DROP, (0, 1)),
        (21.5, Decision.RESTORE, (0, 1)),
        (23.0, Decision.DROP, (0, 1)),
        (33.5, Decision.RESTORE, (0, 1)),
    ]
    small = ControlLoop(loop.shape, loop.cost_model)
    events = small.run(lambda t: {0: 1.2 if 10 <= t < 17 or t >= 23 else 0.1, 1: 0.1}, 40)
    assert events[2] == (32.0, Decision.DROP, (0, 1))


def test_between_samples_a_burst_drops_at_once_and_records_no_sample(
    loop: ControlLoop,
) -> None:
    """A queue that fills the KV 0.05 s after the sample at 10.0 drops at 10.05, not at the
    next sample (10.5); the check records nothing, so the windows see the samples alone.
    Below the at-once level, with a queue that fits or in a group: no verdict. Just after a
    restore, in its cooldown: a verdict."""
    det = loop.detector
    loop.run(lambda t: {0: 0.2, 1: 0.3}, until_s=10)
    calm = loop.loads(10.05, {0: 0.2, 1: 0.3})
    assert det.at_once(10.05, calm) == []
    burst = loop.loads(10.05, {0: 1.48, 1: 1.2})  # 1.2: below the level, left to the dwell
    [verdict] = det.at_once(10.05, burst)
    assert verdict.decision is Decision.DROP and verdict.instance_ids == (0,)
    assert (verdict.t, verdict.latest_demand, round(verdict.demand, 3)) == (10.05, 1.48, 0.2)
    assert verdict.reason == "overloaded at once between samples: demand 1.480 >= 1.25"
    assert [len(h) for h in det._history.values()] == [20, 20]  # 10 s of samples, no more
    fits = [InstanceLoad(0, N, N // 2, 2 * N, 1, RB, 100)]  # demand 2.0; its queue fits
    assert det.at_once(10.1, fits) == []
    grouped = [_pipelined(burst[0], N, (0, 16), 0), _pipelined(burst[1], N, (16, 32), 0)]
    assert det.at_once(10.2, grouped) == []
    det.observe(10.5, grouped)  # the group forms, and splits again at 11.0 (a restore)
    det.observe(11.0, loop.loads(11.0, {0: 0.2, 1: 0.3}))
    assert [v.instance_ids for v in det.at_once(11.05, burst)] == [(0,)]  # in its cooldown
