"""Drop and restore, driven from one place: one state machine per pipeline group.

NORMAL → DROPPING → PIPELINED → RESTORING → NORMAL (KunServe's INITIAL → BALLOON → RESTORE →
INITIAL, reference/kunserve.md §2; DESIGN.md §6). Every member parks its engine between steps
while requests change workers (workers/transition.py has the worker steps); a drop first
stages what it can while they still serve (``drop_stage``). A restore first
gathers each running request's KV onto one home while the group still serves, so the parked
split copies only weights (and the KV of any request the gather could not place).
Transitions are forced by the admin RPCs (coordinator/admin.py) or started by the planner's
decisions (coordinator/overload.py), both through :meth:`Transitions.drop` and
:meth:`Transitions.restore` (the planner's hook is :meth:`Transitions.apply`).

A drop's parked part is one call per member (``drop_switch``): the members trade their
reports among themselves, and each serves again as soon as its part is done.

Ordering: a worker's pushes are applied in step order, but pushes of different workers are not
ordered. Before a restore's requests change workers, each paused worker's last pushed step is
waited for (``Coordinator.wait_applied``); after a drop, the leader's first push names the
other members' last pushed steps (``StepResult.after``) and waits for them at the
coordinator. Either way a request's tokens never arrive out of order.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from coordinator.coordinator import Coordinator, Instance
from planner.drop_plan import stage_layer_ranges
from planner.types import InstanceState
from workers.stalls import PhaseClock
from workers.transition import GroupSpec, TransitionError

logger = logging.getLogger(__name__)

GATHER_POLL_S = 0.05
"""How long a restore waits for the leader to park itself (its live part done) before it
asks again how much is left (seconds)."""


@dataclass
class GroupRecord:
    """One pipeline group as the coordinator tracks it."""

    spec: GroupSpec
    instance_ids: tuple[int, ...]
    """Members, stage order; the first leads (and is the group id)."""
    state: InstanceState
    kv_blocks_before: int
    """Members' normal KV capacity, summed (L-layer blocks)."""
    kv_blocks_after: int = 0
    """The group's block pool (pipeline blocks: one id per token block on every stage)."""
    stage_blocks: tuple[int, ...] = ()
    """Each stage's KV capacity in its own blocks after the drop."""
    num_moved: int = 0
    """Requests that changed workers in the last transition."""
    transition_s: float = 0.0
    """Duration of the last transition (seconds)."""
    paused_s: float = 0.0
    """How long the last transition parked the members (seconds): a drop after its staging;
    a restore's split, after its live gather."""

    @property
    def group_id(self) -> int:
        return self.spec.group_id


class Transitions:
    """Runs one transition at a time. ``num_layers`` is the model's L; drops need the
    ``drop`` overload policy."""

    def __init__(
        self,
        core: Coordinator,
        num_layers: int,
        overload_policy: str,
        gather_timeout_s: float = 30.0,
        gather_stall_s: float = 2.0,
    ) -> None:
        self.core = core
        self.num_layers = num_layers
        self.overload_policy = overload_policy
        self.gather_timeout_s = gather_timeout_s
        """Longest a restore gathers KV live before it splits the group anyway (seconds)."""
        self.gather_stall_s = gather_stall_s
        """A restore stops waiting for the gather when no request has come home for this long
        (seconds): the homes are full, or the requests are not scheduled."""
        self.groups: dict[int, GroupRecord] = {}
        self._lock = asyncio.Lock()

    async def apply(
        self, drop_groups: Sequence[Sequence[int]] = (), restore_groups: Sequence[int] = ()
    ) -> None:
        """The planner hook: drops each group of instance ids (``DropPlan.groups[i]
        .instance_ids``, stage order) and restores each group id (``RestorePlan.group_id``),
        one after the other; raises what the first failing transition raised."""
        for ids in drop_groups:
            await self.drop(ids, trigger="planner")
        for gid in restore_groups:
            await self.restore(gid, trigger="planner")

    # --- drop ---------------------------------------------------------------------------

    async def drop(
        self, instance_ids: Sequence[int] | None = None, trigger: str = "admin"
    ) -> GroupRecord:
        """Merges NORMAL instances (stage order; default: every NORMAL instance) into one
        pipeline group; returns once it serves. Raises TransitionError (nothing changed) when
        the policy is not ``drop``, an instance is not NORMAL, or a member refuses at its
        ``drop_prepare`` (it is in a group already).
        ``trigger`` (admin, planner) labels the ``kunserve:transitions`` counter."""
        with self._counted("drop", trigger):
            return await self._drop(instance_ids)

    async def _drop(self, instance_ids: Sequence[int] | None) -> GroupRecord:
        if self.overload_policy != "drop":
            raise TransitionError(
                f"overload policy is {self.overload_policy!r}: serve with --overload-policy drop"
            )
        async with self._lock:
            members = self._drop_members(instance_ids)
            ranges = tuple(stage_layer_ranges(self.num_layers, len(members)))
            spec = GroupSpec(members[0].instance_id, tuple(m.info.rank for m in members), ranges)
            ids = tuple(m.instance_id for m in members)
            record = GroupRecord(spec, ids, InstanceState.DROPPING, kv_blocks_before=0)
            start, phases = time.monotonic(), PhaseClock()
            # while the members serve on: raises (nothing changed) where the drop cannot run
            await _gather(m.leader.transition.remote("drop_stage", spec) for m in members)
            phases.mark("stage (serving)")
            parked = time.monotonic()
            _pause_began(members)
            for m in members:  # the leader routes new requests from now (they wait its inbox)
                m.group = spec.ranks
            self._set_state(members, InstanceState.DROPPING)
            await self._switch(members, record, phases)
            record.transition_s = time.monotonic() - start
            record.paused_s = time.monotonic() - parked
            self.groups[spec.group_id] = record
            logger.info(
                "drop: instances %s -> pipeline group %d, layers %s, KV %d -> %d blocks "
                "(%.3f s: %s)",
                record.instance_ids,
                spec.group_id,
                ranges,
                record.kv_blocks_before,
                record.kv_blocks_after,
                record.transition_s,
                phases,
            )
            return record

    def _drop_members(self, instance_ids: Sequence[int] | None) -> list[Instance]:
        insts = self.core.instances
        if instance_ids is None or len(instance_ids) == 0:
            instance_ids = [i.instance_id for i in insts if i.state is InstanceState.NORMAL]
        ids = list(instance_ids)
        if len(ids) < 2 or len(set(ids)) != len(ids):
            raise ValueError(f"a drop needs >= 2 distinct instances, got {ids}")
        if len(ids) > self.num_layers:
            raise ValueError(f"{len(ids)} stages exceed the model's {self.num_layers} layers")
        bad = [i for i in ids if not 0 <= i < len(insts)]
        if bad:
            raise ValueError(f"no instance {bad}; instances are 0..{len(insts) - 1}")
        busy = [i for i in ids if insts[i].state is not InstanceState.NORMAL]
        if busy:
            raise TransitionError(f"instances {busy} are not NORMAL")
        return [insts[i] for i in ids]

    async def _switch(
        self, members: list[Instance], record: GroupRecord, phases: PhaseClock
    ) -> None:
        """The parked part of a drop, one call per member (``Worker.switch``, step
        ``drop_switch``, workers/transition.py): each member parks after its step in flight,
        the members trade their reports among themselves, drop, and serve again as a pipeline.
        Then the requests point at the leader. Their tokens stay in order without waiting
        here: the leader's first push is applied only after every other member's last one
        (``StepResult.after``). An abort that reached a member after it gave its requests
        away is sent again to the leader."""
        spec, leader = record.spec, members[0]
        calls = (m.leader.switch.remote("drop_switch", spec) for m in members)
        # every call returns before any error is raised: all members decide together
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        _pause_ended(members)
        phases.mark("switch")
        errors = [o for o in outcomes if isinstance(o, BaseException)]
        if errors:
            if all(isinstance(e, TransitionError) for e in errors):  # nothing changed
                for m in members:  # and every member resumed itself
                    m.group = None
                self._set_state(members, InstanceState.NORMAL)
            else:
                self._fail(members, "drop failed")
            raise errors[0]
        lead = outcomes[0]
        live = [rid for m in members[1:] for rid in m.live]
        moved = self.core.move_requests(dict.fromkeys(lead.exported + live), leader)
        logger.debug("drop: requests %s now on instance %d", moved, leader.instance_id)
        record.kv_blocks_before = lead.normal_blocks
        record.kv_blocks_after = lead.group_blocks
        record.stage_blocks = tuple(o.stage_blocks for o in outcomes)
        record.num_moved = len(moved)
        record.state = InstanceState.PIPELINED
        for m, layers in zip(members, spec.ranges, strict=True):
            m.info = dataclasses.replace(m.info, layer_range=layers)
        self._set_state(members, InstanceState.PIPELINED)
        self._abort_released(lead.exported, {rid: leader for rid in lead.exported})

    # --- restore ------------------------------------------------------------------------

    async def restore(self, group_id: int | None = None, trigger: str = "admin") -> GroupRecord:
        """Splits a PIPELINED group (default: the only one) back into NORMAL instances; returns
        once they serve. Raises TransitionError (the group keeps serving as a pipeline) when
        its live KV does not fit back, or ValueError for an unknown group."""
        with self._counted("restore", trigger):
            return await self._restore(group_id)

    async def _restore(self, group_id: int | None) -> GroupRecord:
        async with self._lock:
            record = self._restore_group(group_id)
            members = [self.core.instances[i] for i in record.instance_ids]
            start = time.monotonic()
            self._set_state(members, InstanceState.RESTORING)
            record.state = InstanceState.RESTORING
            leader = members[0]
            phases = PhaseClock()
            try:
                await self._gather(leader, phases)
            except BaseException:
                self._set_state(members, InstanceState.PIPELINED)
                record.state = InstanceState.PIPELINED
                raise
            paused = time.monotonic()
            _pause_began(members)  # the leader parks, and with it the group's pipeline
            seq = await leader.leader.pause.remote()
            phases.mark("pause")
            try:
                plan = await leader.leader.transition.remote("restore_plan")
            except BaseException:
                await leader.leader.transition.remote("restore_cancel")
                self._set_state(members, InstanceState.PIPELINED)
                record.state = InstanceState.PIPELINED
                await leader.leader.resume.remote()
                _pause_ended(members)
                raise
            phases.mark("plan")
            await self._execute_restore(members, record, plan, seq, phases)
            record.paused_s = time.monotonic() - paused
            record.transition_s = time.monotonic() - start
            del self.groups[record.group_id]
            logger.info(
                "restore: pipeline group %d -> instances %s (%.3f s: %s)",
                record.group_id,
                record.instance_ids,
                record.transition_s,
                phases,
            )
            return record

    async def _gather(self, leader: Instance, phases: PhaseClock) -> None:
        """The live part of a restore: the leader begins gathering every running request's
        KV onto one home while the group serves, and, on VMM memory, refilling the dropped
        weights from the stages that kept them (workers/transition.py, ``restore_begin``; it
        parks itself after the step that finishes both); returns once nothing is left (or no
        request runs to step the refill), or when what is left has not fallen for
        ``gather_stall_s``, or after ``gather_timeout_s`` (the split then copies the rest)."""
        await self._parked_step(leader, "restore_begin")
        phases.mark("begin")
        start = last_change = time.monotonic()
        best, left = None, (0, 0)
        try:
            while not (ready := await leader.leader.wait_restore_ready.remote(GATHER_POLL_S)):
                stats = await leader.leader.stats.remote()
                left = (stats.num_to_gather, stats.weight_bytes_to_refill)
                now = time.monotonic()
                if best is None or left < best:
                    best, last_change = left, now
                if left[0] == 0 and stats.num_running == 0:
                    break  # idle: nothing steps the refill, and nothing waits on the split
                if now - last_change > self.gather_stall_s or now - start > self.gather_timeout_s:
                    break
        except BaseException:  # the leader may have parked itself once gathered: undo
            await self._parked_step(leader, "restore_cancel")
            raise
        phases.mark("gather")
        if ready:  # the leader parked itself with nothing left (``left`` may be older)
            return
        if left[0]:
            logger.info(
                "restore: %d requests not gathered live; the split copies their KV", left[0]
            )
        if left[1]:
            logger.info(
                "restore: %.1f MiB of weights not refilled live; the split copies them",
                left[1] / 2**20,
            )

    def _restore_group(self, group_id: int | None) -> GroupRecord:
        if group_id is None:
            if len(self.groups) != 1:
                raise ValueError(f"name the group to restore: groups are {sorted(self.groups)}")
            group_id = next(iter(self.groups))
        record = self.groups.get(group_id)
        if record is None:
            raise ValueError(f"no pipeline group {group_id}; groups are {sorted(self.groups)}")
        if record.state is not InstanceState.PIPELINED:
            raise TransitionError(f"group {group_id} is {record.state.name}, not PIPELINED")
        return record

    async def _execute_restore(
        self,
        members: list[Instance],
        record: GroupRecord,
        plan: Any,
        leader_seq: int,
        phases: PhaseClock,
    ) -> None:
        leader = members[0]
        parked = [m.leader.pause.remote() for m in members[1:]]
        try:
            await leader.leader.transition.remote("stop_pipeline")
            seqs = await _gather(parked)
            await self.core.wait_applied(leader.info.rank, leader_seq)
            for m, seq in zip(members[1:], seqs, strict=True):
                await self.core.wait_applied(m.info.rank, seq)
            phases.mark("stop")
            # requests point at their homes before any member pushes for them
            by_rank = {m.info.rank: m for m in members}
            homes = {rid: by_rank[rank] for rid, rank in plan.homes.items()}
            for m in members:
                self.core.move_requests([r for r, h in homes.items() if h is m], m)
            # each member serves again as soon as it has executed
            await _gather(m.leader.finish_parked.remote("restore_execute", plan) for m in members)
            _pause_ended(members)
            phases.mark("execute and resume")
        except BaseException:
            self._fail(members, "restore failed")
            raise
        logger.debug("restore: request homes %s", {r: h.instance_id for r, h in homes.items()})
        record.num_moved = sum(h is not leader for h in homes.values())
        record.state = InstanceState.NORMAL
        for m in members:
            m.group = None
            m.info = dataclasses.replace(m.info, layer_range=(0, self.num_layers))
        self._set_state(members, InstanceState.NORMAL)
        self._abort_released(list(homes), homes)

    # --- shared -------------------------------------------------------------------------

    @staticmethod
    async def _parked_step(inst: Instance, step: str) -> None:
        """Runs one transition step on ``inst``'s worker parked between engine steps, and
        resumes it whether the step raised or not (one call: ``Worker.run_parked``)."""
        await inst.leader.run_parked.remote(step)

    def _set_state(self, members: list[Instance], state: InstanceState) -> None:
        for m in members:
            m.state = state
            self.core.metrics.on_instance_state(m.instance_id, state)

    @contextlib.contextmanager
    def _counted(self, kind: str, trigger: str) -> Iterator[None]:
        """Counts one transition by outcome: ok, refused (TransitionError or ValueError:
        nothing changed) or failed (anything else)."""
        outcome = "failed"
        try:
            yield
            outcome = "ok"
        except (TransitionError, ValueError):
            outcome = "refused"
            raise
        finally:
            self.core.metrics.on_transition(kind, trigger, outcome)

    def _abort_released(self, request_ids: list[str], owner: dict[str, Instance]) -> None:
        """Requests that finished or were aborted here while they moved may still run on
        their new worker (the abort went to the old one): abort them there."""
        gone = [rid for rid in request_ids if rid not in self.core.requests]
        for rid in gone:
            owner[rid].leader.abort.remote([rid])
        if gone:
            logger.debug("transition: re-sent aborts for %s", gone)

    def _fail(self, members: list[Instance], why: str) -> None:
        """A transition failed after the point of no return: end the group's requests."""
        for m in members:
            self.core.fail_instance(m, f"{why} on instance {m.instance_id}")

    def status(self) -> list[GroupRecord]:
        return [self.groups[g] for g in sorted(self.groups)]

    async def check_integrity(self) -> None:
        """Runs every worker's block-pool check (``Worker.check_integrity``); raises what a
        failing check raised. Meant for an idle server."""
        await _gather(i.workers[0].check_integrity.remote() for i in self.core.instances)


def _pause_began(members: Sequence[Instance]) -> None:
    """Marks when a transition asks ``members`` to park (``Instance.last_pause``)."""
    for m in members:
        m.last_pause = (time.time(), 0.0)


def _pause_ended(members: Sequence[Instance]) -> None:
    """Marks when a transition has resumed every one of ``members``."""
    now = time.time()
    for m in members:
        m.last_pause = (m.last_pause[0], now)


async def _gather(refs: Any) -> list:
    return list(await asyncio.gather(*refs))
