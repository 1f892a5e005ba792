"""Automatic drop and restore: the control loop between the instances' loads and the planner.

Every ``PlannerConfig.sample_interval_s`` the :class:`OverloadController` turns each instance's
latest ``EngineStats`` into an ``InstanceLoad``, feeds ``OverloadDetector.observe`` and
``decide`` (planner/detector.py), and, when it acts (``--overload-policy drop`` without
``--no-auto-transitions``), turns DROP verdicts into ``plan_drop`` and RESTORE verdicts into
``plan_restore`` (planner/drop_plan.py) and runs them through ``Transitions.apply``, one
transition at a time (DESIGN.md §6.1-6.2; KunServe's coordinator loop, reference/kunserve.md
§3(e)). Between samples, every ``at_once_check_s``, it checks the same stats (each worker
pushes them with every step) for a drop at once (``OverloadDetector.at_once``), without
recording a sample. When it does not act it still observes, so the logs and
``kunserve:kv_demand_perc`` show what the planner would have done.

Cost model. Each worker profiles itself at start-up (``WorkerInfo.decode_profile``: a decode
step of all L layers at a few batch sizes; ``WorkerInfo.link_bandwidth``: a timed exchange
with every peer), and the ``StepProfile`` takes, per batch size, the median over the workers
(``StepTimes``). Workers that report no profile (test doubles) leave it to what the instances
report while serving: the median decode step time (``EngineStats.step_time_s`` of steps that
only decoded) of the latest samples, flat in batch size, and before the first one a nominal
``DEFAULT_DECODE_STEP_S``. Without a measured link (CPU workers) the link is the nominal
``DEFAULT_LINK_BANDWIDTH_BYTES_PER_S``; its latency is always the nominal
``DEFAULT_LINK_LATENCY_S``.

Compute use. Each worker also times a prefill step at start-up
(``WorkerInfo.prefill_tokens_per_s``). Each sample, the controller divides the tokens an
instance computed since the last sample (``EngineStats.tokens_computed``) by the time between
them, averages that rate over the samples (weight ``COMPUTE_USE_WEIGHT``), and sets it beside
the peak as ``InstanceLoad.compute_use``; the planner does not drop for an instance that is
short of compute rather than of KV (``PlannerConfig.max_compute_use``).
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from coordinator.coordinator import Coordinator, Instance
from coordinator.transitions import Transitions
from planner.config import PlannerConfig
from planner.cost_model import CostModel, StepProfile, rejection
from planner.detector import Decision, OverloadDetector, Verdict
from planner.drop_plan import evaluate_group, plan_drop, plan_restore
from planner.types import InstanceLoad, InstanceState, ModelShape
from workers.config import ModelConfig
from workers.engine import EngineStats
from workers.transition import TransitionError

logger = logging.getLogger(__name__)

DEFAULT_DECODE_STEP_S = 0.01
"""Decode step time the cost model assumes until an instance reports one (seconds)."""
DEFAULT_LINK_BANDWIDTH_BYTES_PER_S = 10e9
"""Nominal one-way bandwidth between two members (bytes/s; below NVLink, about PCIe 4)."""
DEFAULT_LINK_LATENCY_S = 50e-6
"""Nominal latency of one small message between two members (seconds)."""
_STEP_SAMPLES = 64
"""Decode step times the profile's median is taken over."""


def model_shape(model: ModelConfig, dtype_bytes: int, block_size: int) -> ModelShape:
    """The planner's byte sizes of ``model`` with weights of ``dtype_bytes`` per element."""
    return ModelShape.from_dims(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        intermediate_size=model.intermediate_size,
        num_heads=model.num_heads,
        num_kv_heads=model.num_kv_heads,
        head_dim=model.head_dim,
        vocab_size=model.vocab_size,
        dtype_bytes=dtype_bytes,
        block_size=block_size,
        tie_word_embeddings=model.tie_word_embeddings,
    )


COMPUTE_USE_WEIGHT = 0.2
"""Weight of the latest sample in an instance's average token rate (about the last 2.5 s at
the default 0.5 s sampling). At 0.5, one sample's dip let a drop through in the 2x H200
Azure-code replay, whose other 22 samples were refused at 55-71% of the peak."""


class StepTimes:
    """Decode step times as a ``StepProfile`` over all L layers (module docstring).

    ``startup``: seconds of a decode step by batch size from the workers' start-up profiles
    (one point per batch: the cost model interpolates in batch size); ``link_bandwidth``: the
    measured one (bytes/s). Without ``startup``, only steps the instances report that did
    nothing but decode count (``num_step_tokens <= num_running``: one token per running
    request, no prefill chunk), as one point, the median of the last ``_STEP_SAMPLES``, flat
    in batch size (samples of one step each are too noisy, on a shared CPU above all, to fit a
    batch curve); before the first one it is ``DEFAULT_DECODE_STEP_S``.
    """

    def __init__(
        self,
        num_layers: int,
        startup: dict[int, float] | None = None,
        link_bandwidth: float | None = None,
    ) -> None:
        self.num_layers = num_layers
        self.startup = dict(startup or {})
        self.link_bandwidth = link_bandwidth or DEFAULT_LINK_BANDWIDTH_BYTES_PER_S
        self.decode: deque[float] = deque(maxlen=_STEP_SAMPLES)
        """The latest decode-only step times (seconds)."""

    def record(self, stats: EngineStats) -> None:
        if 0 < stats.num_step_tokens <= stats.num_running and stats.step_time_s > 0:
            self.decode.append(stats.step_time_s)

    @classmethod
    def from_workers(cls, num_layers: int, infos: list) -> StepTimes:
        """From the workers' ``WorkerInfo``: per batch size the median of their start-up
        times, and the median of their measured link bandwidths."""
        batches: dict[int, list[float]] = {}
        for info in infos:
            for batch, seconds in getattr(info, "decode_profile", {}).items():
                batches.setdefault(batch, []).append(seconds)
        links = [b for info in infos if (b := getattr(info, "link_bandwidth", None))]
        return cls(
            num_layers,
            {batch: statistics.median(times) for batch, times in batches.items()},
            statistics.median(links) if links else None,
        )

    def profile(self) -> StepProfile:
        layers = self.num_layers
        if self.startup:
            decode = {(layers, batch): seconds for batch, seconds in self.startup.items()}
        else:
            seconds = statistics.median(self.decode) if self.decode else DEFAULT_DECODE_STEP_S
            decode = {(layers, 1): seconds}
        return StepProfile(
            decode=decode,
            link_bandwidth_bytes_per_s=self.link_bandwidth,
            link_latency_s=DEFAULT_LINK_LATENCY_S,
        )


class OverloadController:
    """Samples the loads, asks the detector, plans and starts drops and restores.

    Built after ``Coordinator.attach``: each instance's normal KV capacity is the one its worker
    reported at load time (a pipelined leader reports the group's pool instead, and a member
    other than the leader a pool of its own layers). ``act`` False: it observes and logs the
    verdicts but never starts a transition. A transition that is refused (``TransitionError``,
    ``ValueError``: nothing changed) is logged as a warning and not retried for the same
    instances before ``cooldown_s``; one that fails part-way has already ended its group's
    requests (``Transitions``) and is logged as an error. Neither stops the loop.
    """

    def __init__(
        self,
        core: Coordinator,
        transitions: Transitions,
        shape: ModelShape,
        config: PlannerConfig,
        act: bool,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.core = core
        self.transitions = transitions
        self.shape = shape
        self.config = config
        self.act = act
        self.clock = clock
        self.detector = OverloadDetector(config)
        self.step_times = StepTimes.from_workers(shape.num_layers, [i.info for i in core.instances])
        self.normal_blocks = {i.instance_id: i.info.stats.kv_blocks_total for i in core.instances}
        self.peak_tokens_per_s = {
            i.instance_id: getattr(i.info, "prefill_tokens_per_s", None) for i in core.instances
        }
        self._computed: dict[int, tuple[float, int]] = {}
        """Instance id -> (time, EngineStats.tokens_computed) at the last sample."""
        self._token_rate: dict[int, float] = {}
        """Instance id -> its average token rate over recent samples (tokens/s)."""
        self._streak: dict[tuple[int, ...], Decision] = {}
        self._no_plan: set[int] = set()
        """Instances whose DROP streak already logged that no plan pays off."""
        self._refused_until: dict[tuple[str, tuple[int, ...]], float] = {}

    async def run(self) -> None:
        """Ticks every ``sample_interval_s`` until cancelled, and in between checks for a drop
        at once every ``at_once_check_s`` (:meth:`check_at_once`; 0: never); a tick or check
        that raises is logged and the loop goes on (the planner must not take the server
        down)."""
        interval, check = self.config.sample_interval_s, self.config.at_once_check_s
        next_sample = self.clock()
        while True:
            sampling = self.clock() >= next_sample
            try:
                await (self.tick() if sampling else self.check_at_once())
            except Exception:
                logger.exception("planner: %s failed", "tick" if sampling else "check")
            if sampling:
                next_sample = self.clock() + interval
            wait = max(0.0, next_sample - self.clock())
            await asyncio.sleep(min(wait, check) if check > 0 else wait)

    async def tick(self) -> None:
        """One sample: observe, decide, and (when acting) start what the verdicts call for."""
        now = self.clock()
        self.observe_compute(now)
        loads = self.loads()
        self.detector.observe(now, loads)
        verdicts = self.detector.decide()
        keys = {v.instance_ids for v in verdicts}  # a key gone (into a group, or out of one)
        self._streak = {k: d for k, d in self._streak.items() if k in keys}  # ends its streak
        for v in verdicts:
            self._announce(v)
        if not self.act:
            return
        hot = [v for v in verdicts if v.decision is Decision.DROP]
        if hot:
            await self._drop(loads, hot, now)
        for v in verdicts:
            if v.decision is Decision.RESTORE:
                await self._restore(loads, v, now)

    async def check_at_once(self) -> None:
        """Between samples: starts a drop for each instance whose latest load (pushed with
        its worker's every step) is overloaded at once (``OverloadDetector.at_once``), as a
        sample would; records no sample. Only when acting."""
        if not self.act:
            return
        now = self.clock()
        loads = self.loads(record=False)
        hot = self.detector.at_once(now, loads)
        for v in hot:
            self._announce(v)
        if hot:
            await self._drop(loads, hot, now)

    def observe_compute(self, now: float) -> None:
        """Updates each instance's average token rate from its latest stats (module
        docstring); an instance whose counter went back (a restarted engine) starts over."""
        for inst in self.core.instances:
            tokens = inst.stats.tokens_computed
            last = self._computed.get(inst.instance_id)
            self._computed[inst.instance_id] = (now, tokens)
            if last is None or now <= last[0] or tokens < last[1]:
                continue
            rate = (tokens - last[1]) / (now - last[0])
            old = self._token_rate.get(inst.instance_id, rate)
            self._token_rate[inst.instance_id] = old + COMPUTE_USE_WEIGHT * (rate - old)

    def compute_use(self, instance_id: int) -> float:
        """The instance's average token rate over its profiled peak (0 without a profile)."""
        peak = self.peak_tokens_per_s.get(instance_id)
        if not peak:
            return 0.0
        return self._token_rate.get(instance_id, 0.0) / peak

    def loads(self, record: bool = True) -> list[InstanceLoad]:
        """Every instance's ``InstanceLoad`` from its latest stats (module docstring);
        ``record`` also feeds the normal instances' decode step times to the cost model (once
        per sample: a check between samples would count the same step again)."""
        group_of = {
            i: (gid, rec.instance_ids[0])
            for gid, rec in self.transitions.groups.items()
            for i in rec.instance_ids
        }
        loads = []
        for inst in self.core.instances:
            if record and inst.state is InstanceState.NORMAL:
                self.step_times.record(inst.stats)
            group_id, leader = group_of.get(inst.instance_id, (None, inst.instance_id))
            loads.append(self._load(inst, group_id, holds_requests=leader == inst.instance_id))
        return loads

    def _load(self, inst: Instance, group_id: int | None, holds_requests: bool) -> InstanceLoad:
        """A group's requests are all on its leader; the other members report none."""
        s = inst.stats
        demand = s.kv_demand_blocks if holds_requests else 0
        in_group = group_id is not None
        return InstanceLoad(
            instance_id=inst.instance_id,
            kv_blocks_total=self.normal_blocks[inst.instance_id],
            kv_blocks_used=s.kv_blocks_used if holds_requests else 0,
            kv_demand_blocks=demand,
            num_waiting=s.num_waiting if holds_requests else 0,
            waiting_demand_blocks=min(demand, s.waiting_demand_blocks) if holds_requests else 0,
            num_running=s.num_running if holds_requests else 0,
            step_token_fill=s.step_token_fill if holds_requests else 0.0,
            compute_use=self.compute_use(inst.instance_id) if not in_group else 0.0,
            state=inst.state,
            layer_range=tuple(inst.info.layer_range) if in_group else None,
            group_id=group_id if in_group else None,
        )

    # --- acting ---------------------------------------------------------------------------

    async def _drop(self, loads: list[InstanceLoad], hot: list[Verdict], now: float) -> None:
        ids = {i for v in hot for i in v.instance_ids if self._may_try("drop", (i,), now)}
        if not ids:
            return
        cost = CostModel(self.step_times.profile(), self.shape)
        plan = plan_drop(loads, self.shape, cost, self.config, overloaded=ids)
        if plan is None:  # retried every sample while the verdict holds; logged once a streak
            level = logging.DEBUG if ids <= self._no_plan else logging.INFO
            if logger.isEnabledFor(level):
                why = self._why_no_plan(loads, ids, cost)
                logger.log(level, "planner: no drop plan pays off for %s: %s", sorted(ids), why)
            self._no_plan |= ids
            return
        for group in plan.groups:
            est = group.estimate
            logger.info(
                "planner: dropping instances %s into a %d-stage pipeline: KV %d -> %d blocks "
                "for a demand of %d, predicted TBT %.2f ms (%.2f ms unpipelined)",
                group.instance_ids,
                group.g,
                group.capacity_before_blocks,
                group.capacity_after_blocks,
                group.demand_blocks,
                est.tbt_after_s * 1e3,
                est.tbt_unpipelined_s * 1e3,
            )
            seeds = tuple(i for i in group.instance_ids if i in ids)
            await self._attempt(
                "drop", seeds, now, lambda g=group: self.transitions.apply([g.instance_ids])
            )

    def _why_no_plan(self, loads: list[InstanceLoad], ids: set[int], cost: CostModel) -> str:
        """The cost model's objection to the smallest group around the most pressured seed
        (the first group ``plan_drop`` tries), for the log."""
        normal = [ld for ld in loads if ld.state is InstanceState.NORMAL and ld.group_id is None]
        by_pressure = sorted(normal, key=lambda ld: (ld.demand_fraction, ld.instance_id))
        seeds = [ld for ld in reversed(by_pressure) if ld.instance_id in ids]
        partners = [ld for ld in by_pressure if ld is not seeds[0]] if seeds else []
        if not partners:
            return "no normal instance to merge with"
        group = evaluate_group([seeds[0], partners[0]], self.shape, cost, self.config)
        reason = rejection(group.estimate, self.config)
        return f"group {group.instance_ids}: {reason or 'no objection at g = 2'}"

    async def _restore(self, loads: list[InstanceLoad], verdict: Verdict, now: float) -> None:
        key = (verdict.group_id,)
        if not self._may_try("restore", key, now):
            return
        members = [ld for ld in loads if ld.group_id == verdict.group_id]
        plan = plan_restore(members, self.shape, self.config)
        if plan is None:
            logger.debug("planner: group %d may not restore yet", verdict.group_id)
            return
        logger.info(
            "planner: restoring group %d (instances %s, live KV %d of %d blocks)",
            plan.group_id,
            plan.instance_ids,
            plan.live_demand_blocks,
            plan.capacity_limit_blocks,
        )
        await self._attempt(
            "restore", key, now, lambda: self.transitions.apply(restore_groups=[plan.group_id])
        )

    async def _attempt(
        self, kind: str, key: tuple[int, ...], now: float, start: Callable[[], Awaitable[Any]]
    ) -> None:
        try:
            await start()
        except (TransitionError, ValueError) as e:
            logger.warning("planner: %s %s refused: %s", kind, key, getattr(e, "cause", None) or e)
            self._refused_until[(kind, key)] = now + self.config.cooldown_s
        except Exception:
            logger.exception("planner: %s %s failed", kind, key)

    def _may_try(self, kind: str, key: tuple[int, ...], now: float) -> bool:
        """False within ``cooldown_s`` of a refusal of the same transition."""
        until = self._refused_until.get((kind, key))
        if until is not None and now < until:
            return False
        self._refused_until.pop((kind, key), None)
        return True

    # --- visibility -----------------------------------------------------------------------

    def _announce(self, v: Verdict) -> None:
        """Sets the demand gauge; logs a DROP or RESTORE verdict when it starts a streak."""
        for i in v.instance_ids:
            self.core.metrics.on_demand(i, v.demand)
        key = v.instance_ids
        if v.decision is Decision.NONE:
            self._streak.pop(key, None)
            self._no_plan.difference_update(key)
            if v.dwelling == 1 and v.group_id is None:  # a drop's dwell begins
                logger.info(
                    "planner: instance %d %s (demand %.3f, smoothed %.3f)",
                    key[0],
                    v.reason,
                    v.latest_demand,
                    v.demand,
                )
            return
        if self._streak.get(key) is v.decision:
            return
        self._streak[key] = v.decision
        what = f"group {v.group_id}" if v.group_id is not None else f"instance {key[0]}"
        acting = "" if self.act else " (observing only: no automatic transitions)"
        use = ""
        if v.group_id is None and self.peak_tokens_per_s.get(key[0]):
            use = f", compute use {self.compute_use(key[0]):.2f}"
        logger.info("planner: %s for %s: %s%s%s", v.decision.value, what, v.reason, use, acting)
