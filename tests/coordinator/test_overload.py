"""The overload control loop without Ray: loads from stats, verdicts into plans into
``Transitions.apply`` calls, the recompute policy, and refused or failing transitions."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

import pytest

from coordinator.overload import (
    DEFAULT_DECODE_STEP_S,
    DEFAULT_LINK_BANDWIDTH_BYTES_PER_S,
    OverloadController,
    StepTimes,
    model_shape,
)
from coordinator.transitions import GroupRecord, Transitions
from planner.config import PlannerConfig
from planner.types import InstanceLoad, InstanceState
from tests.coordinator.test_coordinator import STORIES, make_coordinator, make_stats
from workers.config import ModelConfig
from workers.engine import EngineStats
from workers.transition import GroupSpec, TransitionError
from workers.worker import WorkerInfo

CONFIG = PlannerConfig(
    sample_interval_s=0.5, window_s=1.0, smoothing_s=0.5, min_dwell_s=0.5, cooldown_s=2.0
)
"""Decides on one sample (no smoothing, one-sample dwell); refusals back off 2 s."""


class FakeTransitions:
    """Records ``apply`` calls; raises ``errors`` (one per call, None for success) in turn."""

    def __init__(self, *errors: BaseException | None) -> None:
        self.groups: dict[int, GroupRecord] = {}
        self.calls: list[tuple[list, list]] = []
        self.errors = list(errors)

    async def apply(self, drop_groups=(), restore_groups=()) -> None:
        self.calls.append(([tuple(g) for g in drop_groups], list(restore_groups)))
        if self.errors and (error := self.errors.pop(0)) is not None:
            raise error


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def stats(used: int, demand: int, waiting: int = 0, waiting_demand: int = 0, running: int = 4):
    return dataclasses.replace(
        make_stats(),
        num_running=running,
        num_waiting=waiting,
        kv_blocks_used=used,
        kv_demand_blocks=demand,
        waiting_demand_blocks=waiting_demand,
    )


def make_controller(transitions, act: bool = True, config: PlannerConfig = CONFIG):
    core, _ = make_coordinator()  # two instances of 100 blocks
    shape = model_shape(ModelConfig.from_dir(STORIES), dtype_bytes=4, block_size=16)
    clock = Clock()
    return OverloadController(core, transitions, shape, config, act, clock), core, clock


async def ticks(ctl: OverloadController, clock: Clock, n: int) -> None:
    for _ in range(n):
        await ctl.tick()
        clock.t += ctl.config.sample_interval_s


def overload_instance_0(core) -> None:
    """Instance 0 full with 6 requests (60 blocks) queued; instance 1 nearly idle."""
    core.instances[0].stats = stats(used=100, demand=160, waiting=6, waiting_demand=60)
    core.instances[1].stats = stats(used=10, demand=10, running=1)


def pipeline(core, transitions) -> None:
    """Instances 0 and 1 as pipelined group 0; the leader reports the group pool of 195
    blocks, the other stage its own pool and no requests."""
    spec = GroupSpec(0, (0, 1), ((0, 3), (3, 5)))
    record = GroupRecord(spec, (0, 1), InstanceState.PIPELINED, kv_blocks_before=200)
    transitions.groups[0] = record
    for inst, layers, total in zip(core.instances, spec.ranges, (195, 195), strict=True):
        inst.state = InstanceState.PIPELINED
        inst.group = spec.ranks
        inst.info = dataclasses.replace(inst.info, layer_range=layers)
        inst.stats = dataclasses.replace(make_stats(total), kv_blocks_used=3)


def test_loads_use_normal_capacity_and_put_a_groups_requests_on_its_leader() -> None:
    transitions = FakeTransitions()
    ctl, core, _ = make_controller(transitions)
    overload_instance_0(core)
    assert ctl.loads()[0] == InstanceLoad(0, 100, 100, 160, 6, 60, 4)
    pipeline(core, transitions)
    core.instances[0].stats = dataclasses.replace(
        stats(used=40, demand=50, waiting=1, waiting_demand=10), kv_blocks_total=195
    )
    assert ctl.loads() == [
        InstanceLoad(0, 100, 40, 50, 1, 10, 4, InstanceState.PIPELINED, (0, 3), 0),
        InstanceLoad(1, 100, 0, 0, 0, 0, 0, InstanceState.PIPELINED, (3, 5), 0),
    ]


def test_a_drop_verdict_applies_the_plans_groups(caplog: pytest.LogCaptureFixture) -> None:
    transitions = FakeTransitions()
    ctl, core, clock = make_controller(transitions)
    overload_instance_0(core)
    with caplog.at_level(logging.INFO, logger="coordinator.overload"):
        asyncio.run(ticks(ctl, clock, 1))
    assert transitions.calls == [([(0, 1)], [])]  # seed 0 leads, idle 1 is its partner
    assert "drop for instance 0: overloaded for 1 samples: demand 1.600" in caplog.text
    assert "dropping instances (0, 1) into a 2-stage pipeline" in caplog.text


def test_the_first_sample_of_a_drops_dwell_is_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With a two-sample dwell the first overloaded sample is logged (demand and smoothed
    demand) and the second drops; a third dwell line never appears. (Demand 1.6 stays below
    the at-once level here, so the dwell applies.)"""
    transitions = FakeTransitions()
    config = dataclasses.replace(CONFIG, min_dwell_s=1.0, cooldown_s=0.0, drop_at_once_demand=2.0)
    ctl, core, clock = make_controller(transitions, config=config)
    overload_instance_0(core)
    with caplog.at_level(logging.INFO, logger="coordinator.overload"):
        asyncio.run(ticks(ctl, clock, 1))
        assert transitions.calls == []
        asyncio.run(ticks(ctl, clock, 1))
    assert transitions.calls == [([(0, 1)], [])]
    dwell = "planner: instance 0 overloaded on 1 of 2 samples (demand 1.600, smoothed 1.600)"
    assert caplog.text.count(dwell) == 1
    assert "overloaded for 2 samples: demand 1.600 (latest sample 1.600)" in caplog.text


def test_between_samples_a_queue_beyond_the_kv_drops_at_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A sample sees instance 0 calm; its next pushed stats show 1.6x the KV, and the check
    between samples drops it then. The check records no decode step time; observing only
    (the recompute policy), it starts nothing."""
    transitions = FakeTransitions()
    ctl, core, clock = make_controller(transitions)
    core.instances[0].stats = stats(used=50, demand=50)
    asyncio.run(ticks(ctl, clock, 1))
    overload_instance_0(core)
    core.instances[0].stats = dataclasses.replace(
        core.instances[0].stats, num_step_tokens=4, step_time_s=0.02
    )  # a decode-only step: a sample would record it
    with caplog.at_level(logging.INFO, logger="coordinator.overload"):
        asyncio.run(ctl.check_at_once())
    assert transitions.calls == [([(0, 1)], [])]
    assert "overloaded at once between samples: demand 1.600 >= 1.25" in caplog.text
    assert list(ctl.step_times.decode) == []
    watcher, core, _ = make_controller(FakeTransitions(), act=False)
    overload_instance_0(core)
    asyncio.run(watcher.check_at_once())
    assert watcher.transitions.calls == []


def test_the_loop_checks_between_samples() -> None:
    """Samples 10 s apart, checks every 10 ms: an overload that comes after the first sample
    drops long before the second."""
    config = dataclasses.replace(
        CONFIG, sample_interval_s=10.0, window_s=20.0, smoothing_s=10.0, min_dwell_s=10.0,
        at_once_check_s=0.01,
    )  # fmt: skip
    transitions = FakeTransitions()
    ctl, core, _ = make_controller(transitions, config=config)
    ctl.clock = time.monotonic

    async def body() -> float:
        task = asyncio.ensure_future(ctl.run())
        await asyncio.sleep(0.05)  # the first sample has been taken
        overload_instance_0(core)
        t0 = time.monotonic()
        while not transitions.calls:
            await asyncio.sleep(0.005)
        task.cancel()
        return time.monotonic() - t0

    assert asyncio.run(asyncio.wait_for(body(), 5)) < 1.0
    assert transitions.calls == [([(0, 1)], [])]


def test_a_drop_after_a_restore_is_logged_again(caplog: pytest.LogCaptureFixture) -> None:
    """Instance 0 drops, its group restores, and it overloads again: the second drop verdict
    is logged too (the first one's streak ended when the instance joined the group)."""
    transitions = FakeTransitions()
    ctl, core, clock = make_controller(
        transitions, config=dataclasses.replace(CONFIG, cooldown_s=0)
    )
    with caplog.at_level(logging.INFO, logger="coordinator.overload"):
        overload_instance_0(core)
        asyncio.run(ticks(ctl, clock, 1))
        pipeline(core, transitions)
        asyncio.run(ticks(ctl, clock, 1))
        transitions.groups.clear()
        for inst in core.instances:
            inst.state, inst.group = InstanceState.NORMAL, None
        overload_instance_0(core)
        asyncio.run(ticks(ctl, clock, 1))
    assert caplog.text.count("planner: drop for instance 0") == 2


def test_no_drop_for_an_instance_short_of_compute_rather_than_kv(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Both instances profiled at 1,000 tokens/s. Instance 0 overloads while computing 800
    tokens/s (0.8 of its peak, over max_compute_use 0.6): no drop. At 200 tokens/s it drops once
    its average has come down."""
    transitions = FakeTransitions()
    ctl, core, clock = make_controller(transitions)
    ctl.peak_tokens_per_s = {0: 1000.0, 1: 1000.0}
    overload_instance_0(core)

    def computed(tokens: int) -> None:
        core.instances[0].stats = dataclasses.replace(
            core.instances[0].stats, tokens_computed=tokens
        )

    async def run(rate: int, samples: int) -> None:
        for _ in range(samples):
            computed(core.instances[0].stats.tokens_computed + int(rate * 0.5))
            await ticks(ctl, clock, 1)

    caplog.set_level(logging.INFO)
    ctl.observe_compute(clock.t - 0.5)  # the server's earlier samples: a rate from the first
    asyncio.run(run(800, 3))
    assert transitions.calls == [] and ctl.compute_use(0) == pytest.approx(0.8)
    assert "it computes 80% of its peak token rate" in caplog.text
    assert ctl.loads()[0].compute_use == pytest.approx(0.8)
    asyncio.run(run(200, 1))  # the average (weight 0.2): 0.2 + 0.6 * 0.8^n, still over 0.6
    assert transitions.calls == [] and ctl.compute_use(0) > 0.6
    asyncio.run(run(200, 1))  # ... and under it at the second sample
    assert ctl.compute_use(0) < 0.6 and transitions.calls[0] == ([(0, 1)], [])
    assert "demand 1.600 (latest sample 1.600), compute use 0.80" in caplog.text  # 1st verdict
    # a restarted counter starts over instead of reading a negative rate
    computed(0)
    ctl.observe_compute(clock.t + 0.5)
    assert ctl.compute_use(0) >= 0
    # no profile: never refuses for compute
    ctl.peak_tokens_per_s = {}
    assert ctl.compute_use(0) == 0.0


def test_no_drop_while_the_queue_fits_in_the_free_blocks() -> None:
    transitions = FakeTransitions()
    ctl, core, clock = make_controller(transitions)
    core.instances[0].stats = stats(used=50, demand=99, waiting=6, waiting_demand=49)  # 0.99
    asyncio.run(ticks(ctl, clock, 3))
    assert transitions.calls == []


def test_a_restore_verdict_restores_the_group() -> None:
    transitions = FakeTransitions()
    ctl, core, clock = make_controller(transitions)
    pipeline(core, transitions)
    asyncio.run(ticks(ctl, clock, 1))
    assert transitions.calls == [([], [0])]


def test_a_busy_group_does_not_restore() -> None:
    transitions = FakeTransitions()
    ctl, core, clock = make_controller(transitions)
    pipeline(core, transitions)
    core.instances[0].stats = stats(used=150, demand=170)  # 170 / 200 of normal capacity
    asyncio.run(ticks(ctl, clock, 3))
    assert transitions.calls == []


def test_recompute_policy_observes_but_never_applies(caplog: pytest.LogCaptureFixture) -> None:
    transitions = FakeTransitions()
    ctl, core, clock = make_controller(transitions, act=False)
    overload_instance_0(core)
    with caplog.at_level(logging.INFO, logger="coordinator.overload"):
        asyncio.run(ticks(ctl, clock, 4))
    assert transitions.calls == []
    assert caplog.text.count("drop for instance 0") == 1  # logged once per streak
    assert "observing only" in caplog.text
    demand = core.metrics.kv_demand.labels(core.metrics.model_name, "0")._value.get()
    assert demand == pytest.approx(1.6)


def test_a_refused_drop_is_logged_and_retried_after_the_cooldown(
    caplog: pytest.LogCaptureFixture,
) -> None:
    transitions = FakeTransitions(TransitionError("KV does not fit"), None)
    ctl, core, clock = make_controller(transitions)
    overload_instance_0(core)
    with caplog.at_level(logging.WARNING, logger="coordinator.overload"):
        asyncio.run(ticks(ctl, clock, 4))  # t = 0, 0.5, 1.0, 1.5 s: within the 2 s cooldown
        assert len(transitions.calls) == 1
        asyncio.run(ticks(ctl, clock, 1))  # t = 2.0 s
    assert transitions.calls == [([(0, 1)], [])] * 2
    assert "drop (0,) refused: KV does not fit" in caplog.text


def test_a_failing_transition_does_not_stop_the_loop(caplog: pytest.LogCaptureFixture) -> None:
    config = dataclasses.replace(
        CONFIG, sample_interval_s=0.01, window_s=0.02, smoothing_s=0.01, min_dwell_s=0.01
    )
    transitions = FakeTransitions(*[RuntimeError("worker died")] * 100)
    ctl, core, _ = make_controller(transitions, config=config)
    ctl.clock = time.monotonic
    overload_instance_0(core)

    async def body() -> None:
        task = asyncio.ensure_future(ctl.run())
        while len(transitions.calls) < 3:
            await asyncio.sleep(0.01)
        assert not task.done()
        task.cancel()

    with caplog.at_level(logging.ERROR, logger="coordinator.overload"):
        asyncio.run(asyncio.wait_for(body(), 10))
    assert "planner: drop (0,) failed" in caplog.text and "worker died" in caplog.text


def test_transitions_count_by_kind_trigger_and_outcome() -> None:
    core, _ = make_coordinator()
    transitions = Transitions(core, 5, "recompute")
    with pytest.raises(TransitionError):
        asyncio.run(transitions.apply([[0, 1]]))
    counter = core.metrics.transitions.labels(core.metrics.model_name, "drop", "planner", "refused")
    assert counter._value.get() == 1


def test_step_times_profile_the_median_decode_step() -> None:
    times = StepTimes(num_layers=5)
    assert times.profile().decode == {(5, 1): DEFAULT_DECODE_STEP_S}
    decode = EngineStats(3, 0, 100, 30, 20480, 30, 0, step_time_s=0.02, num_step_tokens=3)
    for seconds in (0.02, 0.05, 0.03):
        times.record(dataclasses.replace(decode, step_time_s=seconds))
    times.record(dataclasses.replace(decode, num_step_tokens=64))  # a prefill chunk: ignored
    times.record(dataclasses.replace(decode, num_step_tokens=0))  # an idle step: ignored
    assert times.profile().decode == {(5, 1): 0.03}


def test_step_times_take_the_workers_start_up_profile() -> None:
    """Per batch size the median over the workers' start-up times, the median measured link;
    serving-time samples do not replace it."""
    infos = [
        WorkerInfo(0, "gpu", (0, 32), 8192, make_stats(100), {1: 0.004, 8: 0.005}, 380e9),
        WorkerInfo(1, "gpu", (0, 32), 8192, make_stats(100), {1: 0.006, 8: 0.007}, 360e9),
        WorkerInfo(2, "gpu", (0, 32), 8192, make_stats(100), {1: 0.005, 8: 0.009}, None),
    ]
    times = StepTimes.from_workers(32, infos)
    decode = EngineStats(3, 0, 100, 30, 20480, 30, 0, step_time_s=0.02, num_step_tokens=3)
    times.record(decode)
    profile = times.profile()
    assert profile.decode == {(32, 1): 0.005, (32, 8): 0.007}
    assert profile.link_bandwidth_bytes_per_s == 370e9
    bare = StepTimes.from_workers(32, [WorkerInfo(0, "cpu", (0, 32), 512, make_stats(100))])
    assert bare.profile().link_bandwidth_bytes_per_s == DEFAULT_LINK_BANDWIDTH_BYTES_PER_S
