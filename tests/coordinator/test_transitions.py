"""The drop/restore state machine without Ray: states, request bookkeeping, push ordering,
aborts that race a move, and a drop refused before its point of no return."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest

from coordinator.transitions import Transitions
from planner.types import InstanceState
from tests.coordinator.test_coordinator import (
    FakeWorker,
    _Method,
    make_coordinator,
    make_stats,
    parsed,
    step,
)
from workers.request import Request, RequestStatus, SamplingParams
from workers.scheduler import RequestOutput
from workers.transition import (
    DropOutcome,
    DropReport,
    RequestTransfer,
    RestorePlan,
    TransitionError,
)


class GroupWorker(FakeWorker):
    """A FakeWorker that also pauses, resumes and answers transition steps from ``answers``
    (a value, or a function of the step's arguments)."""

    def __init__(self, rank: int, answers: dict) -> None:
        super().__init__(make_stats())
        self.rank = rank
        self.seq = 0
        self.answers = answers
        answers.setdefault("drop_stage", 0.001)  # staged while serving, host seconds
        self.steps: list[str] = []
        self.pause = _Method(self._pause)
        self.resume = _Method(self._resume)
        self.transition = _Method(self._transition)
        self.run_parked = _Method(self._run_parked)
        self.finish_parked = _Method(self._finish_parked)
        self.switch = _Method(self._switch)
        self.peers: dict = {}
        """Shared by the members of a drop: their reports by spec (``drop_switch``)."""
        self.ready = False
        """What ``wait_restore_ready`` answers (the engine parked itself after a restore's
        live part)."""
        self.wait_restore_ready = _Method(self._wait_restore_ready)

    async def _wait_restore_ready(self, timeout_s: float) -> bool:
        await asyncio.sleep(0 if self.ready else min(timeout_s, 0.001))
        return self.ready

    async def _pause(self) -> int:
        return self.seq

    async def _resume(self) -> None:
        return None

    async def _run_parked(self, name: str, *args):
        await self.pause.remote()
        try:
            return await self._transition(name, *args)
        finally:
            await self.resume.remote()

    async def _switch(self, name: str, spec):
        """``Worker.switch`` of ``drop_switch``: this member's prepare answer, the members'
        reports traded (``peers``), then its execute answer, as GroupController does."""
        assert name == "drop_switch"
        await self._pause()
        try:
            result = await self._drop_switch(spec)
        except TransitionError:
            await self.resume.remote()
            raise
        await self.resume.remote()
        return result

    async def _drop_switch(self, spec):
        self.steps.append("drop_switch")
        try:
            report = await self._transition("drop_prepare", spec)
        except Exception as e:
            report = f"worker {self.rank}: {e}"
        reports = self.peers.setdefault(id(spec), {})
        reports[self.rank] = report
        while len(reports) < len(spec.ranks):
            await asyncio.sleep(0)
        ordered = [reports[rank] for rank in spec.ranks]
        failed = [r for r in ordered if isinstance(r, str)]
        if failed:
            raise TransitionError(f"drop cancelled: {'; '.join(failed)}")
        blocks = min(r.stage_blocks for r in ordered)
        if self.rank != spec.ranks[0]:
            return DropOutcome(self.rank, await self._transition("drop_execute", spec, blocks))
        stage_blocks = await self._transition("drop_execute", spec, blocks, ordered)
        exported = [t.request.request_id for r in ordered[1:] for t in r.transfers]
        normal = sum(r.normal_blocks for r in ordered)
        return DropOutcome(self.rank, stage_blocks, blocks, normal, exported)

    async def _finish_parked(self, name: str, *args):
        result = await self._transition(name, *args)
        await self.resume.remote()
        return result

    async def _transition(self, name: str, *args):
        self.steps.append(name)
        answer = self.answers[name]
        return answer(*args) if callable(answer) else answer


def _request(rid: str) -> Request:
    r = Request(rid, [1, 2, 3], SamplingParams(), 8, frozenset(), status=RequestStatus.RUNNING)
    r.num_computed_tokens = 3
    return r


def _report(rank: int, holding: list[str]) -> DropReport:
    transfers = [RequestTransfer(_request(rid), None, rank) for rid in holding]
    return DropReport(rank, 150, 4096, 100, len(holding), transfers)


def _setup(answers0: dict, answers1: dict):
    core, _ = make_coordinator()
    workers = [GroupWorker(0, answers0), GroupWorker(1, answers1)]
    workers[1].peers = workers[0].peers
    for inst, w in zip(core.instances, workers, strict=True):
        inst.workers = [w]
    return core, workers, Transitions(core, 5, "drop")


def test_drop_then_restore_moves_requests_states_and_routing() -> None:
    async def body():
        core, (w0, w1), tr = _setup({}, {})
        a, b = core.submit("a", parsed(16)), core.submit("b", parsed(16))
        assert (a.instance_id, b.instance_id) == (0, 1)
        w1.seq = 1  # worker 1 pushed step 1 before parking; it is not applied yet

        def prepare1(spec):
            core.abort(["b"])  # the client cancels while b moves: the abort goes to worker 1
            return _report(1, ["b"])

        def execute0(spec, blocks, reports):
            assert [r.rank for r in reports] == [0, 1] and blocks == 150  # merged here
            return 140

        def execute1(spec, blocks, *reports):
            assert not reports  # only the leader merges
            return 150

        w0.answers.update(drop_prepare=lambda spec: _report(0, ["a"]), drop_execute=execute0)
        w1.answers.update(drop_prepare=prepare1, drop_execute=execute1)
        out = RequestOutput("b", [7])
        asyncio.get_running_loop().call_later(0.05, core.on_step, step(1, 1, [out]))
        asked = time.time()
        record = await tr.drop([0, 1])
        for inst in core.instances:  # parked from the ask to the last resume, after staging
            start, end = inst.last_pause
            assert asked <= start <= end <= time.time()
            assert end - start == pytest.approx(record.paused_s, abs=0.01)
        assert (record.kv_blocks_before, record.kv_blocks_after) == (200, 150)
        assert record.stage_blocks == (140, 150) and record.spec.ranges == ((0, 3), (3, 5))
        assert [i.state for i in core.instances] == [InstanceState.PIPELINED] * 2
        assert [i.group for i in core.instances] == [(0, 1), (0, 1)]
        assert [i.info.layer_range for i in core.instances] == [(0, 3), (3, 5)]
        assert w0.abort.calls[-1] == (["b"],)  # re-sent to b's new worker
        c = core.submit("c", parsed(16))
        assert c.instance_id == 0 and core.instances[0].live == {"a", "c"}
        assert core.route() is core.instances[0]

        homes = {"a": 0, "c": 1}
        w0.answers.update(
            restore_begin=None,
            restore_plan=RestorePlan([], homes, {1: []}, {}, {0: 100, 1: 100}),
            stop_pipeline=None,
            restore_execute=100,
        )
        w1.answers.update(restore_execute=100)
        # the leader gathers live: 2 requests left, then 1, then none
        left = iter([2, 2, 1, 0])
        w0.stats = _Method(lambda: _async(make_stats_gathering(next(left))))
        dropped = core.instances[0].last_pause
        back = await tr.restore()
        assert len(w0.stats.calls) == 4  # the split waited for the gather
        for inst in core.instances:  # the split's parked window, after the live gather
            assert dropped[1] < inst.last_pause[0] <= inst.last_pause[1]
            assert inst.last_pause[1] - inst.last_pause[0] == pytest.approx(back.paused_s, abs=0.01)
        assert back.state is InstanceState.NORMAL and not tr.groups
        assert [i.state for i in core.instances] == [InstanceState.NORMAL] * 2
        assert [i.group for i in core.instances] == [None, None]
        assert [i.info.layer_range for i in core.instances] == [(0, 5), (0, 5)]
        assert (core.requests["c"].instance_id, core.instances[1].live) == (1, {"c"})
        assert w0.steps == ["drop_stage", "drop_switch", "drop_prepare", "drop_execute"] + [
            "restore_begin",
            "restore_plan",
            "stop_pipeline",
            "restore_execute",
        ]
        assert w1.steps[:4] == ["drop_stage", "drop_switch", "drop_prepare", "drop_execute"]
        assert w1.steps[4:] == ["restore_execute"]
        assert len(w0.resume.calls) == 3 and len(w1.resume.calls) == 2

    asyncio.run(body())


def make_stats_gathering(left: int):
    return dataclasses.replace(make_stats(), num_to_gather=left)


async def _async(value):
    return value


def test_refused_restore_cancels_the_gather_and_a_stalled_gather_splits_anyway() -> None:
    async def body():
        core, (w0, w1), tr = _setup({}, {})
        tr.gather_stall_s = 0.05
        w0.answers.update(drop_prepare=lambda spec: _report(0, ["a"]), drop_execute=140)
        w1.answers.update(drop_prepare=lambda spec: _report(1, []), drop_execute=150)
        await tr.drop([0, 1])

        def refuse():
            raise TransitionError("request a needs 9 blocks; no member has them free")

        w0.answers.update(restore_begin=None, restore_plan=refuse, restore_cancel=None)
        w0.stats = _Method(lambda: _async(make_stats_gathering(1)))  # never comes home
        with pytest.raises(TransitionError, match="needs 9 blocks"):
            await tr.restore()
        assert w0.steps[-3:] == ["restore_begin", "restore_plan", "restore_cancel"]
        assert tr.groups[0].state is InstanceState.PIPELINED
        assert [i.state for i in core.instances] == [InstanceState.PIPELINED] * 2
        assert len(w0.stats.calls) >= 2  # it polled until the count stalled

        def no_begin():
            raise TransitionError("worker 0 does not lead a pipeline group")

        w0.answers.update(restore_begin=no_begin)
        resumed = len(w0.resume.calls)
        with pytest.raises(TransitionError, match="does not lead"):
            await tr.restore()
        assert tr.groups[0].state is InstanceState.PIPELINED
        assert [i.state for i in core.instances] == [InstanceState.PIPELINED] * 2
        assert len(w0.resume.calls) == resumed + 1  # the leader serves again

    asyncio.run(body())


def test_restore_waits_for_the_leader_to_park_after_its_live_part_with_requests_running() -> None:
    """With requests running, the split waits until the leader parks itself after the step
    that finishes the gather and the weight refill (``wait_restore_ready``), not when the
    counts reach zero at that step's launch; an idle leader splits at once."""

    async def body():
        core, (w0, w1), tr = _setup({}, {})
        w0.answers.update(drop_prepare=lambda spec: _report(0, ["a"]), drop_execute=140)
        w1.answers.update(drop_prepare=lambda spec: _report(1, []), drop_execute=150)
        await tr.drop([0, 1])
        plan = RestorePlan([], {"a": 0}, {1: []}, {}, {0: 100, 1: 100})
        w0.answers.update(restore_begin=None, restore_plan=plan, stop_pipeline=None)
        w0.answers.update(restore_execute=100)
        w1.answers.update(restore_execute=100)
        refill = iter([2 << 30, 1 << 30, 0, 0, 0])

        def stats():
            w0.ready = len(w0.stats.calls) >= 4  # parks after the step that refilled the last
            running = dataclasses.replace(make_stats(), num_running=2)
            return _async(dataclasses.replace(running, weight_bytes_to_refill=next(refill)))

        w0.stats = _Method(stats)
        await tr.restore()
        assert len(w0.stats.calls) == 4 and w0.steps[-1] == "restore_execute"

        await tr.drop([0, 1])
        w0.ready, w0.stats = False, _Method(lambda: _async(make_stats()))  # idle, none running
        await tr.restore()
        assert len(w0.stats.calls) == 1

    asyncio.run(body())


def test_refused_drop_changes_nothing() -> None:
    async def body():
        core, (w0, w1), tr = _setup({}, {})
        core.submit("a", parsed(16))

        def prepare(spec):
            raise TransitionError("worker 1 is already in group 0")

        w0.answers.update(drop_prepare=lambda spec: _report(0, ["a"]))
        w1.answers.update(drop_prepare=prepare)
        with pytest.raises(TransitionError, match="already in group"):
            await tr.drop()
        assert [i.state for i in core.instances] == [InstanceState.NORMAL] * 2
        assert core.requests["a"].instance_id == 0 and not tr.groups
        assert len(w0.resume.calls) == len(w1.resume.calls) == 1

        # a drop that cannot be staged fails before any member parks
        def stage(spec):
            raise ValueError("the KV range has room for 0 more slots")

        w1.answers.update(drop_stage=stage)
        with pytest.raises(ValueError, match="room for 0 more slots"):
            await tr.drop()
        assert [i.state for i in core.instances] == [InstanceState.NORMAL] * 2
        assert [i.group for i in core.instances] == [None, None]
        assert w0.steps[-1] == w1.steps[-1] == "drop_stage"
        assert len(w0.switch.calls) == len(w1.switch.calls) == 1  # the first drop's
        with pytest.raises(ValueError, match="no pipeline group"):
            await tr.restore(0)
        with pytest.raises(ValueError, match=">= 2 distinct"):
            await tr.drop([1, 1])
        with pytest.raises(TransitionError, match="--overload-policy drop"):
            await Transitions(core, 5, "recompute").drop()

    asyncio.run(body())


def test_a_failed_prepare_resumes_a_member_only_after_it_has_parked() -> None:
    """Each member pauses, trades reports and resumes in one call: when one member's prepare
    fails while another is still waiting out its step, that member resumes only after its
    pause returned (a resume first would leave it parked), and the drop raises once every
    member has answered."""

    async def body():
        core, (w0, w1), tr = _setup({}, {})
        events: list[str] = []

        async def slow_pause() -> int:
            await asyncio.sleep(0.05)  # its engine finishes the step in flight
            events.append("w0 parked")
            return 0

        async def resume() -> None:
            events.append("w0 resumed")

        def fail(spec):
            raise RuntimeError("worker 1 could not export its requests")

        w0._pause = slow_pause
        w0.resume = _Method(resume)
        w0.answers.update(drop_prepare=lambda spec: _report(0, []))
        w1.answers.update(drop_prepare=fail)
        with pytest.raises(RuntimeError, match="could not export"):
            await tr.drop()
        assert events == ["w0 parked", "w0 resumed"]
        assert [i.state for i in core.instances] == [InstanceState.NORMAL] * 2
        assert len(w1.resume.calls) == 1

    asyncio.run(body())


def test_requests_arriving_during_a_drop_wait_on_the_leader_and_none_is_refused() -> None:
    async def body():
        core, (w0, w1), tr = _setup({}, {})
        arrived = []

        def prepare(rank):
            def answer(spec):
                arrived.append(core.submit(f"mid-{rank}", parsed(16)))  # no UNAVAILABLE
                return _report(rank, [])

            return answer

        w0.answers.update(drop_prepare=prepare(0), drop_execute=140)
        w1.answers.update(drop_prepare=prepare(1), drop_execute=150)
        await tr.drop([0, 1])
        assert [s.instance_id for s in arrived] == [0, 0]
        assert core.instances[0].live == {"mid-0", "mid-1"} and not core.instances[1].live

        # A refused drop gives the instances back as they were, routable on their own.
        core2, (v0, v1), tr2 = _setup({}, {})
        v0.answers.update(drop_prepare=lambda spec: _report(0, []))
        v1.answers.update(drop_prepare=lambda spec: (_ for _ in ()).throw(TransitionError("no")))
        with pytest.raises(TransitionError):
            await tr2.drop([0, 1])
        assert [i.group for i in core2.instances] == [None, None]
        assert [core2.submit(r, parsed(16)).instance_id for r in "xy"] == [0, 1]

    asyncio.run(body())


def test_a_failed_execute_fails_the_group_and_leaves_that_member_parked() -> None:
    """Each member resumes as soon as its own last step returns; one whose step raised stays
    parked, and the group's requests end."""

    async def body():
        core, (w0, w1), tr = _setup({}, {})
        core.submit("a", parsed(16))

        def execute1(spec, blocks):
            raise RuntimeError("cuMemMap failed")

        w0.answers.update(drop_prepare=lambda spec: _report(0, ["a"]), drop_execute=140)
        w1.answers.update(drop_prepare=lambda spec: _report(1, []), drop_execute=execute1)
        with pytest.raises(RuntimeError, match="cuMemMap"):
            await tr.drop([0, 1])
        assert [i.state for i in core.instances] == [InstanceState.FAILED] * 2
        assert "a" not in core.requests and not tr.groups
        assert (len(w0.resume.calls), len(w1.resume.calls)) == (1, 0)

    asyncio.run(body())
