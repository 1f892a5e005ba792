"""Worker side of a drop and a restore, while the engines are parked between steps.

KunServe §3(a), §3(c), §3(d) (reference/kunserve.md); DESIGN.md §6. The coordinator
(coordinator/transitions.py) pauses every member of a group between engine steps, then calls
these steps on them through ``Worker.transition``, all members at once where it says "every".
A drop's steps 1 and 2 run inside one call per member, ``drop_switch`` (``Worker.switch``:
pause, both steps, resume), the members trading their reports among themselves:

drop
  0. ``drop_stage`` (every), while the engines still serve: the stage model and, on VMM
     memory, the KV range's new mappings (:meth:`StageMemory.stage_drop`), so that the
     parked steps below change only what must change at once. From its start the engine's
     steps stay short (``Engine.hold_prompts``: decodes only, or a few prompt tokens where
     none decodes), and it returns once the step then in flight has ended: every member
     then parks after a short step, and none waits out another's long prompt step while
     its own requests wait for a token.
  1. ``drop_prepare`` (every): apply the inbox, report the stage's capacity after the drop and,
     on members other than the leader, export their requests (pickled, no tensors); the
     reports go to the leader point to point, and the leader answers with the group pool's
     size (or a refusal, when some member's prepare failed: then nothing changes anywhere).
  2. ``drop_execute`` (every): the leader first merges the reports (:meth:`GroupController
     .drop_merge`: one group block pool of min-over-stages blocks and the merged request
     queues; no KV is copied, running requests keep their KV home). Every member then drops
     the other stages' weights and gives their memory to the KV bytes (workers/stage_memory
     .py; the prefix, where pre-drop KV lives, is kept); the leader adopts the running
     requests as pre-drop requests (their L-layer blocks reserved in the group pool,
     workers/remote_attention.py) and runs the group scheduler through
     :class:`~workers.pipeline.PipelineRunner`, the others a
     :class:`~workers.pipeline.StageLoop`. Pre-drop requests keep decoding through remote
     attention from the next step while the live exchange moves their KV.

restore
  0. ``restore_begin`` (leader), then the group serves on: each step gathers a budget of
     running requests' KV onto one home each (KunServe §3(d) step 4; workers/remote_attention
     .py, live gather), and they keep decoding through remote attention. Waiting requests are
     held until the split. On VMM memory the same steps refill the dropped weights from the
     stages that kept them, once the KV tail the drop lent is fenced (workers/weight_exchange
     .py). The coordinator waits until every running request is home and the weights are in
     (or a deadline passes; ``restore_cancel`` undoes the step when the restore is refused).
  1. ``restore_plan`` (leader, parked, pipeline still up): finishes moving any pre-drop KV
     partly moved (one exchange-only step); a request whose KV is whole on one home stays
     there in the same blocks; every other gets a home (back to where it came from when it
     fits, else the least-loaded member), L-layer blocks there, and a KV copy plan. Raises
     TransitionError, changing no placement, when the live KV does not fit.
  2. ``stop_pipeline`` (leader): STOP to every stage; each stage loop returns and parks.
  3. ``restore_execute`` (every): read the slices still to copy, shrink the KV bytes back,
     copy the dropped weights not refilled live from the stage that kept them, write the
     slices, rebuild each member's engine with its requests. Requests pause for this step:
     after a full gather and refill it copies nothing.

Requests keep ``num_computed_tokens`` (their KV moves with them), so nothing is recomputed.
"""

from __future__ import annotations

import copy
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from attention.transport import StageTransport, recv_object, send_object
from workers import kv_exchange, weight_exchange
from workers.block_pool import BlockPool, KVCacheManager
from workers.config import exchange_bytes_per_step
from workers.kv_exchange import BlockMove, SliceCopy
from workers.pipeline import PipelineRunner, Refill, StageLoop
from workers.remote_attention import GroupKVManager, GroupLayout
from workers.request import Request, RequestStatus
from workers.scheduler import Scheduler
from workers.stage_memory import StagedDrop, StageMemory, stage_memory_for
from workers.stalls import PhaseClock
from workers.weight_exchange import WeightCopy, WeightPrefetch

logger = logging.getLogger(__name__)

PROMPT_HOLD_S = 1.0
"""Longest a member's steps stay short once its drop is staged (``drop_stage``,
``Engine.hold_prompts``): the switch ends the hold once the member is parked; this bounds it
where no switch comes (another member's stage failed)."""


class TransitionError(RuntimeError):
    """A drop or restore cannot start (wrong mode, KV does not fit); nothing was changed."""


@dataclass(frozen=True)
class GroupSpec:
    """A pipeline group: global ``torch.distributed`` ranks in stage order (``ranks[0]`` leads)
    and the decoder layers ``[start, end)`` each stage keeps."""

    group_id: int
    ranks: tuple[int, ...]
    ranges: tuple[tuple[int, int], ...]

    def __post_init__(self) -> None:
        if len(self.ranks) < 2 or len(set(self.ranks)) != len(self.ranks):
            raise ValueError(f"a group needs >= 2 distinct ranks, got {self.ranks}")
        if len(self.ranges) != len(self.ranks):
            raise ValueError(f"{len(self.ranks)} ranks but {len(self.ranges)} layer ranges")

    def stage_of(self, rank: int) -> int:
        return self.ranks.index(rank)

    @property
    def layout(self) -> GroupLayout:
        return GroupLayout(self.ranks, self.ranges)


@dataclass
class RequestTransfer:
    """A request moving between workers through Ray. ``request.block_ids`` are the blocks that
    hold its KV on the sender (drop) or its new blocks on the receiver (restore)."""

    request: Request
    generator_state: bytes | None
    """Its seeded sampler's generator state, or None (unseeded, or not sampled yet)."""
    origin: int | None
    """Rank of the instance that served it before the drop; None if it arrived after."""


@dataclass
class DropReport:
    """What a member tells the coordinator at ``drop_prepare``."""

    rank: int
    stage_blocks: int
    """M_r = floor((KV bytes + freed weight bytes) / stage block bytes)."""
    freed_bytes: int
    normal_blocks: int
    """Its L-layer blocks before the drop (N)."""
    used_blocks: int
    transfers: list[RequestTransfer] = field(default_factory=list)
    """Its requests, running then waiting (members other than the leader)."""
    refills_in_place: bool = False
    """Its memory can refill dropped weights while the group serves (``StageMemory``)."""
    last_seq: int = 0
    """The worker's last pushed step (``Worker.last_seq``): the leader's first push after a
    :meth:`GroupController.drop_switch` is applied only after it (``StepResult.after``)."""


@dataclass
class DropOutcome:
    """What :meth:`GroupController.drop_switch` tells the coordinator, from every member."""

    rank: int
    stage_blocks: int
    """This stage's capacity in its own blocks after the drop."""
    group_blocks: int = 0
    """Leader: the group pool's blocks (min over the stages)."""
    normal_blocks: int = 0
    """Leader: the members' L-layer blocks before the drop, summed."""
    exported: list[str] = field(default_factory=list)
    """Leader: the requests the other members handed it, running then waiting."""


@dataclass
class RestorePlan:
    """The leader's restore plan: who gets which request, and the KV copies."""

    copies: list[SliceCopy]
    homes: dict[str, int]
    """Request id -> rank of its home after the restore."""
    transfers: dict[int, list[RequestTransfer]]
    """Requests for each member other than the leader, running then waiting, new blocks set."""
    new_blocks: dict[str, list[int]]
    """Running request id -> its L-layer blocks on its home."""
    normal_blocks: dict[int, int]
    weights_done: tuple[WeightCopy, ...] = ()
    """Weight copies the live restore ran while the group served (the split skips them)."""


@dataclass
class _Merge:
    """The leader's pending drop (from ``drop_merge`` to the end of ``drop_execute``)."""

    kv: GroupKVManager
    running: list[Request]
    waiting: list[Request]
    incoming: list[RequestTransfer]


class GroupController:
    """A worker's part in its group's transitions; the worker calls :meth:`call` from an actor
    thread while its engine thread is parked (``drop_stage``: while it serves), and runs
    :attr:`stage_loop` when it is set."""

    STEPS = (
        "drop_stage",
        "drop_switch",
        "drop_prepare",
        "drop_execute",
        "restore_begin",
        "restore_cancel",
        "stop_pipeline",
        "restore_plan",
        "restore_execute",
        "describe",
    )

    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self.spec: GroupSpec | None = None
        self.stage_loop: StageLoop | None = None
        self.transport: StageTransport | None = None
        self.memory: StageMemory | None = None
        self.legacy_view: torch.Tensor | None = None
        """In pipeline mode, this worker's KV bytes as L-layer blocks (pre-drop KV)."""
        """Weights out, KV in (made at the first drop, kept: it knows the normal KV size)."""
        self.normal_blocks: dict[int, int] = {}
        self.origins: dict[str, int] = {}
        self._merge: _Merge | None = None
        self._staged: StagedDrop | None = None
        """The next drop's :meth:`drop_stage` (taken by its ``drop_execute``)."""
        self._restore: RestorePlan | None = None
        self.park_when_gathered = False
        """Leader, during a restore's gather: park the engine after the step that brings the
        last running request home (and refills the last weights), so no further step delays
        the split."""
        self.refills_in_place = False
        """Leader: every member's memory can refill weights while the group serves."""

    def call(self, step: str, *args: Any) -> Any:
        if step not in self.STEPS:
            raise ValueError(f"unknown transition step {step!r}; steps: {list(self.STEPS)}")
        return getattr(self, step)(*args)

    @property
    def rank(self) -> int:
        return self.worker.rank

    @property
    def engine(self) -> Any:
        return self.worker.engine

    def describe(self) -> dict[str, Any]:
        """Mode, layer range and KV capacity, for status and tests."""
        runner = _base_runner(self.engine)
        return {
            "group_id": None if self.spec is None else self.spec.group_id,
            "layer_range": (runner.model.start, runner.model.end),
            "kv_blocks": runner.kv_cache.shape[0],
            "pool_blocks": self.engine.pool.num_blocks,
            "stage_loop": self.stage_loop is not None,
        }

    # --- drop ---------------------------------------------------------------------------

    def drop_stage(self, spec: GroupSpec) -> float:
        """Runs while the engine serves (an actor thread beside the engine thread): stages
        this worker's part of ``spec``'s drop (:meth:`StageMemory.stage_drop`), changing
        nothing the engine reads, so that ``drop_execute`` makes no driver call and builds no
        model while requests wait. From its start the engine's steps stay short
        (``Engine.hold_prompts``, for at most :data:`PROMPT_HOLD_S`, ended by the switch), and
        this returns once the step in flight then has ended (waiting at most half that): the
        switch then parks every member after a short step. Returns its host time
        (seconds). Raises TransitionError when the worker is in a group, ValueError when the
        drop is impossible (nothing changed)."""
        if self.spec is not None:
            raise TransitionError(f"worker {self.rank} is already in group {self.spec.group_id}")
        start, runner = time.perf_counter(), self.engine.runner
        mark = self.worker.iteration()
        self.engine.hold_prompts(PROMPT_HOLD_S)
        try:
            if self.memory is None:
                self.memory = stage_memory_for(runner)
            self._staged = None
            self._staged = self.memory.stage_drop(
                runner.model, spec.ranges[spec.stage_of(self.rank)]
            )
        except BaseException:
            self.engine.hold_prompts(0)
            raise
        seconds = time.perf_counter() - start
        ended = self.worker.wait_iteration(mark, PROMPT_HOLD_S / 2)
        logger.debug(
            "drop staged on %d in %.1f ms (%d chunks mapped); the step in flight ended: %s "
            "after %.1f ms",
            self.rank,
            1e3 * seconds,
            self._staged.premapped,
            ended,
            1e3 * (time.perf_counter() - start),
        )
        return seconds

    def drop_prepare(self, spec: GroupSpec) -> DropReport:
        if self.spec is not None:
            raise TransitionError(f"worker {self.rank} is already in group {self.spec.group_id}")
        self.worker.drain_inbox()
        engine, runner = self.engine, self.engine.runner
        if self.memory is None:
            self.memory = stage_memory_for(runner)
        start, end = spec.ranges[spec.stage_of(self.rank)]
        after = self.memory.bytes_after_drop(runner.model, (start, end))
        freed = after - self.memory.nbytes
        stage_blocks = after // self.memory.block_bytes(end - start)
        transfers = [] if spec.ranks[0] == self.rank else self._export(self.rank)
        logger.debug(
            "drop prepare on %d: %d stage blocks, %d freed bytes, exports %s",
            self.rank,
            stage_blocks,
            freed,
            [t.request.request_id for t in transfers],
        )
        pool = engine.pool
        return DropReport(
            self.rank,
            stage_blocks,
            freed,
            pool.num_blocks,
            pool.num_used,
            transfers,
            self.memory.refills_in_place,
            self.worker.last_seq,
        )

    def drop_switch(self, spec: GroupSpec) -> DropOutcome:
        """Every member, parked, all at once: the drop's prepare and execute in one coordinator
        call, the members trading their reports among themselves (the default process group,
        point to point) instead of through the coordinator. Each member other than the leader
        sends its :meth:`drop_prepare` report to the leader and waits for the group pool's
        size; the leader gathers the reports (stage order), answers each, and runs
        :meth:`drop_execute` with them; every member then runs its own ``drop_execute``.

        The leader's first push after it carries every other member's last pushed step
        (``Worker.push_after``), so the coordinator, which moves the requests only after this
        call, still applies each request's tokens in order.

        Raises TransitionError, with nothing changed on any member, when some member's
        prepare fails (every member learns it through the same exchange); anything raised
        after that leaves the group half dropped (the coordinator fails it)."""
        leader = spec.ranks[0]
        self.engine.hold_prompts(0)  # parked now: whether or not the drop goes on
        clock = PhaseClock()
        device = self.engine.runner.device
        sync = _device_sync(device)
        try:
            if sync is not None:  # parked: the device should be idle (a wait here is logged)
                sync()
                clock.mark("device idle")
            report: DropReport | str = self.drop_prepare(spec)
        except Exception as e:  # told to the others: none may wait for this member
            report = f"worker {self.rank}: {type(e).__name__}: {e}"
        clock.mark("prepare")
        if self.rank != leader:
            send_object(leader, report, device)
            clock.mark("report sent")
            group_blocks = recv_object(leader, device)
            clock.mark("answer")
            if isinstance(report, str) or group_blocks is None:
                raise TransitionError(f"drop cancelled on worker {self.rank}: {report}")
            self._log_switch(clock, report)
            return DropOutcome(self.rank, self._execute_begun(spec, group_blocks))
        reports: list[DropReport | str] = [report]
        for rank in spec.ranks[1:]:  # every member hears back, whatever arrives
            try:
                reports.append(recv_object(rank, device))
            except Exception as e:
                reports.append(f"worker {rank}: its report could not be read: {e}")
        clock.mark("reports in")
        failed = [r for r in reports if isinstance(r, str)]
        group_blocks = None if failed else min(r.stage_blocks for r in reports)
        for rank in spec.ranks[1:]:
            send_object(rank, group_blocks, device)
        clock.mark("answers")
        if failed:
            raise TransitionError(f"drop cancelled: {'; '.join(failed)}")
        self._log_switch(clock, *reports)
        stage_blocks = self._execute_begun(spec, group_blocks, reports)
        self.worker.push_after = {r.rank: r.last_seq for r in reports[1:]}
        return DropOutcome(
            self.rank,
            stage_blocks,
            group_blocks,
            sum(r.normal_blocks for r in reports),
            [t.request.request_id for r in reports for t in r.transfers],
        )

    def _log_switch(self, clock: PhaseClock, *reports: DropReport) -> None:
        """Where this member's part of a drop's parked window went before its
        ``drop_execute`` (which logs its own): the wait for its engine to park after the step
        in flight, on CUDA the wait for its device to idle, its prepare, and the reports'
        trade (pickled requests: their tokens): a member's report sent and the leader's
        answer, or the leader's reports in (each waits for the slowest member to park) and its
        answers."""
        tokens = sum(t.request.num_tokens for r in reports for t in r.transfers)
        logger.info(
            "drop switch on worker %d: parked %.1f ms after the call, %s; %d requests of %d "
            "tokens traded",
            self.rank,
            1e3 * getattr(self.worker, "last_park_s", 0.0),
            clock,
            sum(len(r.transfers) for r in reports),
            tokens,
        )

    def _execute_begun(
        self, spec: GroupSpec, group_blocks: int, reports: list[DropReport] | None = None
    ) -> int:
        """:meth:`drop_execute` within :meth:`drop_switch`: once it begins, nothing it raises
        is a TransitionError (which promises that nothing changed)."""
        try:
            return self.drop_execute(spec, group_blocks, reports)
        except TransitionError as e:
            raise RuntimeError(f"drop failed on worker {self.rank} once begun: {e}") from e

    def _export(self, origin: int | None) -> list[RequestTransfer]:
        sched, sampler = self.engine.scheduler, self.engine.runner.sampler
        return [
            RequestTransfer(_detached(r), sampler.export_state(r.request_id), origin)
            for r in (*sched.running, *sched.waiting)
        ]

    def drop_merge(self, spec: GroupSpec, reports: list[DropReport]) -> None:
        """Leader, first thing in ``drop_execute``: the group pool (min over stages of their
        blocks) and the merged queues; changes nothing the engine uses. Running requests keep
        their admission order, waiting ones put the preempted first, then arrival order. No
        KV is copied: running requests keep theirs home (workers/remote_attention.py)."""
        group_blocks = min(r.stage_blocks for r in reports)
        incoming = [t for r in reports for t in r.transfers]
        everyone = [RequestTransfer(r, None, self.rank) for r in _requests(self.engine)]
        everyone += incoming
        running = [t for t in everyone if t.request.status is RequestStatus.RUNNING]
        running.sort(key=lambda t: t.request.first_scheduled_time or 0.0)
        waiting = [t for t in everyone if t.request.status is not RequestStatus.RUNNING]
        waiting.sort(
            key=lambda t: (t.request.status is not RequestStatus.PREEMPTED, t.request.arrival_time)
        )
        kv = self._group_kv(spec, group_blocks)
        self.normal_blocks = {r.rank: r.normal_blocks for r in reports}
        self.refills_in_place = all(r.refills_in_place for r in reports)
        self.origins = {t.request.request_id: t.origin for t in everyone}
        requests = ([t.request for t in running], [t.request for t in waiting])
        self._merge = _Merge(kv, *requests, incoming)
        logger.debug(
            "drop merge on %d: %d group blocks; running (home) %s; waiting %s",
            self.rank,
            group_blocks,
            {t.request.request_id: t.origin for t in running},
            [t.request.request_id for t in waiting],
        )

    def exchange_bytes(self) -> int:
        """Bytes a live step moves (``--kv-exchange-bytes-per-step``, or ~25 ms of this
        worker's measured link: workers/config.exchange_bytes_per_step)."""
        configured = self.engine.config.cache.kv_exchange_bytes_per_step
        return exchange_bytes_per_step(configured, getattr(self.worker, "link_bandwidth", None))

    def _group_kv(self, spec: GroupSpec, group_blocks: int) -> GroupKVManager:
        runner, cache = _base_runner(self.engine), self.engine.config.cache
        layer_block_bytes = runner.block_bytes // runner.layers_per_block
        return GroupKVManager(
            BlockPool(group_blocks),
            cache.block_size,
            spec.layout,
            layer_block_bytes,
            self.exchange_bytes(),
        )

    @torch.inference_mode()
    def drop_execute(
        self, spec: GroupSpec, group_blocks: int, reports: list[DropReport] | None = None
    ) -> int:
        """Every member: drops weights, re-views KV memory, enters pipeline mode; the leader
        merges every member's ``drop_prepare`` report first (``reports``, stage order: one
        coordinator round fewer than a merge of its own while requests wait). Returns this
        stage's capacity in its own blocks. Raises ValueError when the leader gets no
        reports or another member gets some."""
        engine, runner = self.engine, self.engine.runner
        stage = spec.stage_of(self.rank)
        if (stage == 0) != (reports is not None):
            raise ValueError("drop_execute takes the members' reports on the leader only")
        clock = PhaseClock(_device_sync(runner.device))
        if stage == 0:
            self.drop_merge(spec, reports)
            clock.mark("merge")
        start, end = spec.ranges[stage]
        self.transport = StageTransport(
            runner.device,
            runner.model_config.hidden_size,
            runner.dtype,
            getattr(self.worker, "return_group", None),
        )
        num_layers = runner.model.cfg.num_layers
        staged, self._staged = self._staged, None
        runner.model = self.memory.drop(runner.model, (start, end), staged)
        del staged  # the full model's dropped modules: freed with it (torch allocator)
        clock.mark("weights out")
        _set_kv(runner, self.memory.view(end - start))
        stage_blocks = runner.kv_cache.shape[0]
        self.legacy_view = self.memory.view(num_layers)
        self.spec = spec
        clock.mark("KV views")
        if stage == 0:
            self._become_leader(spec, clock)
        else:
            self._become_stage(spec, stage, group_blocks)
            clock.mark("stage")
        check_block_ownership(engine, deep=_deep_checks())
        clock.mark("checks")
        logger.info(
            "drop on worker %d: %s; layers [%d, %d), %d stage blocks, %d in the group pool; "
            "live steps move %.0f MiB",
            self.rank,
            clock,
            start,
            end,
            stage_blocks,
            group_blocks,
            self.exchange_bytes() / 2**20,
        )
        return stage_blocks

    def _become_leader(self, spec: GroupSpec, clock: PhaseClock) -> None:
        engine, m = self.engine, self._merge
        sampler = engine.runner.sampler
        for t in m.incoming:
            sampler.import_state(t.request.request_id, t.request.sampling.seed, t.generator_state)
        # pre-drop requests: their KV stays home until it has moved
        m.kv.adopt_all([(r, self.origins[r.request_id]) for r in m.running])
        _install(engine, m.kv, m.running, m.waiting)
        clock.mark("leader's requests")
        engine.runner = PipelineRunner(
            engine.runner,
            self.transport,
            spec.ranks,
            spec.layout,
            m.kv,
            self.legacy_view,
            engine.config.scheduler.pipeline_micro_batches,
            self._refill(spec, 0),
        )
        self._merge = None
        clock.mark("leader's runner")

    def _become_stage(self, spec: GroupSpec, stage: int, group_blocks: int) -> None:
        engine = self.engine
        for r in _requests(engine):
            engine.runner.sampler.forget(r.request_id)
        _install(engine, KVCacheManager(BlockPool(group_blocks), engine.kv.block_size), [], [])
        self.stage_loop = StageLoop(
            engine.runner,
            self.transport,
            spec.ranks,
            stage,
            spec.layout,
            self.legacy_view,
            self._refill(spec, stage),
        )

    def _refill(self, spec: GroupSpec, stage: int) -> Refill | None:
        """This stage's weight refill for a live restore's steps (None: the memory cannot)."""
        if not self.memory.refills_in_place:
            return None
        memory, transport = self.memory, self.transport
        return lambda copies: memory.prefetch(copies, spec.ranks, spec.ranges, stage, transport)

    def run_stage_loop(self) -> None:
        """Engine thread of a stage other than the leader: serves until STOP. A fault ends the
        loop (logged): the leader's step then fails and ends the group's requests."""
        try:
            self.stage_loop.run()
        except Exception:
            logger.exception("pipeline stage loop on worker %d failed", self.rank)
        finally:
            self.stage_loop = None

    # --- restore ------------------------------------------------------------------------

    def restore_begin(self) -> None:
        """Leader, parked: the live part of a restore begins. From the next step the group
        gathers each running request's KV onto one home while it keeps decoding, and holds
        waiting requests until the split (workers/remote_attention.py, live gather)."""
        spec = self._require_leader()
        kv, runner = self.engine.kv, self.engine.runner
        kv.begin_gather(dict(self.normal_blocks), dict(self.origins))
        self.engine.scheduler.admitting = False
        self.park_when_gathered = True
        if self.refills_in_place:
            runner.prefetch = self._prefetch(spec, kv)

    def _prefetch(self, spec: GroupSpec, kv: GroupKVManager) -> WeightPrefetch:
        """The restore's weight copies, to run while the group serves once the group-pool ids
        whose bytes may lie past some member's normal KV bytes are fenced: id ``i`` of a stage
        of ``L_r`` layers spans bytes ``[i·L_r, (i+1)·L_r)`` layer blocks, inside the normal
        region of ``N_r`` L-layer blocks while ``i < N_r·L / L_r``."""
        L = spec.layout.num_layers
        first = min(n * L // spec.layout.stage_layers(r) for r, n in self.normal_blocks.items())
        copies = weight_exchange.plan_restore(spec.ranks, spec.ranges, L)
        budget = self.exchange_bytes()
        return WeightPrefetch(
            copies, self.memory.region_nbytes, budget, min(first, kv.pool.num_blocks)
        )

    def restore_cancel(self) -> None:
        """Leader, parked: a restore was refused; the group serves as a pipeline again (new
        requests admitted, the forward exchange resumed)."""
        self._require_leader()
        self.engine.kv.end_gather()
        self.engine.kv.unfence()
        self.engine.runner.prefetch = None
        self.engine.scheduler.admitting = True
        self.park_when_gathered = False

    def restore_plan(self) -> RestorePlan:
        """Leader: homes, L-layer blocks and KV copies for every request (changes nothing
        but the live part's park request: the split has begun, whether or not the leader
        parked itself)."""
        spec, engine = self._require_leader(), self.engine
        # a gather that ended without the leader parking itself (idle, stalled or timed out)
        # must not park it at its first step after the split
        self.park_when_gathered = False
        try:
            runner = engine.runner
            moved = runner.finish_exchange() if isinstance(runner, PipelineRunner) else 0
        except RuntimeError as e:
            raise TransitionError(f"pre-drop KV cannot finish moving: {e}") from e
        if moved:
            logger.debug("restore: finished moving the KV of %d pre-drop requests", moved)
        sched, kv = engine.scheduler, engine.kv
        pools = {rank: BlockPool(n) for rank, n in self.normal_blocks.items()}
        load = {rank: [0, 0] for rank in spec.ranks}  # blocks, requests
        homes, moves, new_blocks = {}, [], {}
        grouped = isinstance(kv, GroupKVManager)
        at_home = [r for r in sched.running if grouped and kv.is_home(r.request_id)]
        for r in at_home:  # all its KV in L-layer blocks on one home: it stays there
            lg = kv.legacy[r.request_id]
            pools[lg.home].reserve(list(lg.blocks))
            load[lg.home][0] += len(lg.blocks)
            load[lg.home][1] += 1
            homes[r.request_id], new_blocks[r.request_id] = lg.home, list(lg.blocks)
        for r in sched.running:
            if r.request_id in homes:
                continue
            n = kv.blocks_needed(r.num_computed_tokens)
            home = self._pick_home(r.request_id, n, pools, load)
            ids = pools[home].allocate(n)
            moves.append(BlockMove(r.request_id, home, tuple(r.block_ids[:n]), tuple(ids)))
            homes[r.request_id] = home
        for r in sched.waiting:
            homes[r.request_id] = self._pick_home(r.request_id, 0, pools, load)
        new_blocks.update({m.request_id: list(m.dst_blocks) for m in moves})
        transfers: dict[int, list[RequestTransfer]] = {rank: [] for rank in spec.ranks[1:]}
        sampler = engine.runner.sampler
        for r in (*sched.running, *sched.waiting):
            if homes[r.request_id] != self.rank:
                moved = _detached(r, new_blocks.get(r.request_id, []))
                state = sampler.export_state(r.request_id)
                transfers[homes[r.request_id]].append(
                    RequestTransfer(moved, state, self.origins.get(r.request_id))
                )
        copies = kv_exchange.plan_restore(moves, spec.ranks, spec.ranges)
        prefetch = getattr(engine.runner, "prefetch", None)
        done = () if prefetch is None else tuple(prefetch.done)
        logger.debug(
            "restore plan on %d: homes %s; KV already home for %s; %d weight copies done",
            self.rank,
            homes,
            [r.request_id for r in at_home],
            len(done),
        )
        self._restore = RestorePlan(
            copies, homes, transfers, new_blocks, dict(self.normal_blocks), done
        )
        return self._restore

    def _pick_home(
        self, rid: str, blocks: int, pools: dict[int, BlockPool], load: dict[int, list[int]]
    ) -> int:
        """The request's origin if its blocks fit there, else the member with the fewest
        blocks (then requests) assigned that fits; raises TransitionError when none fits."""
        fits = [rank for rank, p in pools.items() if p.num_free >= blocks]
        origin = self.origins.get(rid)
        if origin in fits:
            home = origin
        elif fits:
            home = min(fits, key=lambda rank: (load[rank][0], load[rank][1], rank))
        else:
            raise TransitionError(
                f"request {rid} needs {blocks} blocks; no member has them free after restore"
            )
        load[home][0] += blocks
        load[home][1] += 1
        return home

    def stop_pipeline(self) -> None:
        """Leader: sends STOP down the pipeline (each stage loop forwards it and returns)."""
        self._require_leader()
        self.engine.runner.stop()

    @torch.inference_mode()
    def restore_execute(self, plan: RestorePlan) -> int:
        """Every member: moves KV home, shrinks KV memory, copies weights back, leaves the
        group. Returns this worker's L-layer blocks."""
        spec, engine = self.spec, self.engine
        runner = _base_runner(engine)
        stage = spec.stage_of(self.rank)
        clock = PhaseClock(_device_sync(runner.device))
        pending = kv_exchange.read(plan.copies, self.rank, runner.kv_cache, self.transport)
        clock.mark("KV out")
        runner.model = self.memory.restore(
            runner.model, spec.ranks, spec.ranges, stage, self.transport, plan.weights_done
        )
        clock.mark("weights in")
        _set_kv(runner, self.memory.view(runner.model.cfg.num_layers))
        kv_exchange.write(pending, runner.kv_cache)
        if stage == 0:
            self._leave_as_leader(plan)
        else:
            self._leave_as_member(plan)
        self.spec, self.transport, self.origins, self._restore = None, None, {}, None
        clock.mark("KV in")
        runner.capture_cuda_graphs()  # the full model again (a no-op, logged, on CPU)
        check_block_ownership(engine, deep=_deep_checks())
        clock.mark("graphs")
        logger.info(
            "restore on worker %d: %s; %d blocks", self.rank, clock, runner.kv_cache.shape[0]
        )
        return runner.kv_cache.shape[0]

    def _leave_as_leader(self, plan: RestorePlan) -> None:
        engine = self.engine
        engine.runner = _base_runner(engine)
        sched = engine.scheduler
        keep_running = [r for r in sched.running if plan.homes[r.request_id] == self.rank]
        keep_waiting = [r for r in sched.waiting if plan.homes[r.request_id] == self.rank]
        for r in (*sched.running, *sched.waiting):
            if plan.homes[r.request_id] != self.rank:
                engine.runner.sampler.forget(r.request_id)
        for r in keep_running:
            r.block_ids = list(plan.new_blocks[r.request_id])
        pool = _pool_for(plan.normal_blocks[self.rank], keep_running)
        _install(engine, KVCacheManager(pool, engine.kv.block_size), keep_running, keep_waiting)

    def _leave_as_member(self, plan: RestorePlan) -> None:
        engine = self.engine
        sampler = engine.runner.sampler
        incoming = plan.transfers.get(self.rank, [])
        for t in incoming:
            sampler.import_state(t.request.request_id, t.request.sampling.seed, t.generator_state)
        running = [t.request for t in incoming if t.request.status is RequestStatus.RUNNING]
        waiting = [t.request for t in incoming if t.request.status is not RequestStatus.RUNNING]
        pool = _pool_for(plan.normal_blocks[self.rank], running)
        _install(engine, KVCacheManager(pool, engine.kv.block_size), running, waiting)

    def _require_leader(self) -> GroupSpec:
        if self.spec is None or self.spec.ranks[0] != self.rank:
            raise TransitionError(f"worker {self.rank} does not lead a pipeline group")
        return self.spec


# --- helpers ------------------------------------------------------------------------------


def _requests(engine: Any) -> list[Request]:
    return [*engine.scheduler.running, *engine.scheduler.waiting]


def _detached(r: Request, block_ids: list[int] | None = None) -> Request:
    """A copy to send through Ray, with its own block list (``block_ids`` if given)."""
    out = copy.copy(r)
    out.block_ids = list(r.block_ids if block_ids is None else block_ids)
    return out


def _deep_checks() -> bool:
    """Whether a transition runs the block pools' full integrity pass (at debug level: it
    walks every id, several ms on a large KV cache, while requests wait)."""
    return logger.isEnabledFor(logging.DEBUG)


def _base_runner(engine: Any) -> Any:
    """The engine's ModelRunner, unwrapped from a PipelineRunner."""
    r = engine.runner
    return r.runner if isinstance(r, PipelineRunner) else r


def _device_sync(device: torch.device) -> Callable[[], None] | None:
    """What a transition's :class:`PhaseClock` calls before each mark, so a phase owns the
    device work it queued: a CUDA sync (None off CUDA)."""
    if device.type != "cuda":
        return None
    return lambda: torch.cuda.synchronize(device)


def _set_kv(runner: Any, view: torch.Tensor) -> None:
    """Points the runner at a new KV view; its decode graphs are parked until a restore
    (kept then if the weights and this view are where they were at capture)."""
    runner.kv_cache = view
    runner.park_cuda_graphs()


def _pool_for(num_blocks: int, running: list[Request]) -> BlockPool:
    """A fresh pool of ``num_blocks`` with the running requests' block ids taken (the leader
    planned them disjoint; raises RuntimeError when two requests share a block)."""
    pool = BlockPool(num_blocks)
    held = [b for r in running for b in r.block_ids]
    if len(held) != len(set(held)):
        raise RuntimeError(f"planned blocks overlap: {sorted(held)}")
    pool.reserve(held)
    return pool


def _install(
    engine: Any, kv: KVCacheManager, running: list[Request], waiting: list[Request]
) -> None:
    """Gives the engine a new KV manager (and its pool) and a scheduler holding these
    requests (queue order kept)."""
    old, pool = engine.scheduler, kv.pool
    sched = Scheduler(old.config, kv, old.max_model_len)
    sched.running = list(running)
    sched.waiting = deque(waiting)
    sched.num_preemptions = old.num_preemptions
    engine.pool, engine.kv, engine.scheduler = pool, kv, sched


def check_block_ownership(engine: Any, deep: bool = True) -> None:
    """Pool integrity plus: every used block is held by exactly one running request, and no
    waiting request holds blocks. Raises AssertionError. Call between engine steps.
    ``deep=False`` skips the pool's own check, a pass over every id (several ms at 100k
    blocks); the rest costs in proportion to the blocks held."""
    if deep:
        engine.pool.check_integrity()
    held = [b for r in engine.scheduler.running for b in r.block_ids]
    assert len(held) == len(set(held)), "a block is held by two running requests"
    reserved = set(engine.kv.held_ids()) if isinstance(engine.kv, GroupKVManager) else set()
    assert not reserved & set(held), "a pipeline block aliases a pre-drop request's KV"
    assert len(held) + len(reserved) == engine.pool.num_used, (
        f"running requests hold {len(held)} blocks and pre-drop KV reserves {len(reserved)}, "
        f"but the pool has {engine.pool.num_used} used"
    )
    assert not any(r.block_ids for r in engine.scheduler.waiting), "a waiting request holds blocks"
