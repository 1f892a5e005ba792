"""The coordinator: routes requests to instances, dispatches workers' step outputs to streams.

Everything here runs on the coordinator's event loop (one thread), so no locks: Ray threads hand
step results over with ``loop.call_soon_threadsafe``. Worker handles are duck-typed Ray actor
handles (``.add_requests.remote``, ``.abort.remote``, ``.stats.remote``), so tests can pass fakes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from coordinator.metrics import Metrics
from coordinator.request_state import Delta, Finished, RequestState
from coordinator.validation import ModelLimits, ParsedRequest
from planner.types import InstanceState
from workers.engine import EngineStats, RequestSpec
from workers.request import FinishReason, InvalidRequestError
from workers.stalls import LateLog
from workers.tokenizer import Tokenizer
from workers.worker import StepResult, WorkerInfo

logger = logging.getLogger(__name__)


class ServerUnavailableError(RuntimeError):
    """Not ready yet, draining, or no instance can take requests (maps to UNAVAILABLE)."""


class OverloadedError(RuntimeError):
    """Admission control refused the request (maps to RESOURCE_EXHAUSTED)."""


@dataclass
class Instance:
    """The coordinator's view of one serving instance (one worker in normal mode)."""

    instance_id: int
    workers: list[Any]  # actor handles, pipeline stages in order
    info: WorkerInfo
    stats: EngineStats
    state: InstanceState = InstanceState.NORMAL
    live: set[str] = field(default_factory=set)
    group: tuple[int, ...] | None = None
    """Worker ranks of the pipeline group this instance is in, stage order (set from a drop
    to the end of its restore, coordinator/transitions.py); None in normal mode."""
    last_pause: tuple[float, float] = (0.0, 0.0)
    """Unix times (seconds) when the last transition that parked this instance's engines
    asked them to park and when it had resumed them all (0.0: not yet)."""

    @property
    def leader(self) -> Any:
        return self.workers[0]

    @property
    def routable(self) -> bool:
        """Takes new requests: a normal instance, or a group's leader (also while the group
        drops or restores: requests wait in its worker's inbox until the transition ends)."""
        if self.state is InstanceState.NORMAL:
            return True
        leads = self.group is not None and self.group[0] == self.info.rank
        return leads and self.state is not InstanceState.FAILED


class Coordinator:
    def __init__(
        self,
        tokenizer: Tokenizer,
        limits: ModelLimits,
        metrics: Metrics,
        block_size: int,
        max_waiting: int,
        overload_policy: str,
    ) -> None:
        self.tokenizer = tokenizer
        self.limits = limits
        self.metrics = metrics
        self.block_size = block_size
        self.max_waiting = max_waiting
        self.overload_policy = overload_policy
        self.instances: list[Instance] = []
        self.requests: dict[str, RequestState] = {}
        self.ready = False
        self.start_time = time.monotonic()
        self.num_requests_total = 0
        self._next_seq: dict[int, int] = {}
        self._held: dict[int, dict[int, StepResult]] = {}
        self._rank_to_instance: dict[int, Instance] = {}
        self._late_pushes = LateLog("step outputs reached the coordinator late from")

    def attach(self, workers: list[Any], infos: list[WorkerInfo]) -> None:
        """Makes one instance per worker and opens the server for requests."""
        for i, (w, info) in enumerate(zip(workers, infos, strict=True)):
            inst = Instance(i, [w], info, info.stats)
            self.instances.append(inst)
            self.metrics.on_instance_state(i, inst.state)
            self._rank_to_instance[info.rank] = inst
            self._next_seq[info.rank] = 1
            self._held[info.rank] = {}
        self.ready = True

    # --- requests -------------------------------------------------------------------------

    def submit(self, request_id: str, parsed: ParsedRequest) -> RequestState:
        """Routes a validated request; raises ServerUnavailableError, OverloadedError, or
        InvalidRequestError for a request id that is already live."""
        if not self.ready:
            raise ServerUnavailableError("the server is starting; retry shortly")
        if request_id in self.requests:
            raise InvalidRequestError("request_id", f"{request_id!r} is already in use")
        waiting = sum(inst.stats.num_waiting for inst in self.instances)
        if waiting >= self.max_waiting:
            raise OverloadedError(f"{waiting} requests are waiting (limit {self.max_waiting})")
        inst = self.route()
        detok = None
        if parsed.detokenize:
            detok = self.tokenizer.detokenizer(
                parsed.prompt_token_ids, parsed.sampling.skip_special_tokens
            )
        state = RequestState(
            request_id, parsed.prompt_token_ids, parsed.sampling, inst.instance_id, detok
        )
        self.requests[request_id] = state
        inst.live.add(request_id)
        self.num_requests_total += 1
        spec = RequestSpec(request_id, parsed.prompt_token_ids, parsed.sampling, parsed.max_tokens)
        inst.leader.add_requests.remote([spec])
        logger.debug("request %s -> instance %d", request_id, inst.instance_id)
        return state

    def route(self) -> Instance:
        """The least-loaded instance by KV demand: blocks its live requests hold or will hold
        for their current tokens, over its capacity; ties go to fewer live requests."""
        candidates = [i for i in self.instances if i.routable]
        if not candidates:
            raise ServerUnavailableError("no instance can take requests")
        return min(candidates, key=lambda i: (self.demand_fraction(i), len(i.live), i.instance_id))

    def demand_fraction(self, inst: Instance) -> float:
        bs = self.block_size
        blocks = sum(-(-self.requests[r].kv_tokens // bs) for r in inst.live)
        return blocks / max(1, inst.stats.kv_blocks_total)

    def abort(self, request_ids: list[str]) -> list[str]:
        """Aborts live requests (their streams get a final ABORT); returns those that were live."""
        aborted = []
        now = time.monotonic()
        for rid in request_ids:
            state = self.requests.get(rid)
            if state is None:
                continue
            fin = state.abort(now)
            state.queue.put_nowait(fin)
            self._release(state, fin, notify_worker=True)
            aborted.append(rid)
        return aborted

    # --- worker outputs -------------------------------------------------------------------

    def on_step(self, result: StepResult) -> None:
        """Takes one worker push; applies pushes of each worker in step order, each only once
        the pushes it comes after (``StepResult.after``) are applied."""
        self._held[result.rank][result.seq] = result
        self._drain(result.rank)

    def _drain(self, rank: int) -> None:
        held, progressed = self._held[rank], False
        while (step := held.get(self._next_seq[rank])) is not None and self._due(step):
            del held[self._next_seq[rank]]
            self._next_seq[rank] += 1  # first: a fault below must not hold back the rest
            self._apply(step)
            progressed = True
        if progressed:  # pushes of other workers may have waited for these
            for other, waiting in self._held.items():
                if other != rank and waiting:
                    self._drain(other)

    def _due(self, step: StepResult) -> bool:
        """Whether every push ``step`` comes after is applied (or its worker failed)."""
        return all(
            self.applied_seq(rank) >= seq
            or self._rank_to_instance[rank].state is InstanceState.FAILED
            for rank, seq in (step.after or {}).items()
        )

    def _apply(self, result: StepResult) -> None:
        if result.pushed_at:
            self._late_pushes.observe(f"worker {result.rank}", time.time() - result.pushed_at)
        inst = self._rank_to_instance[result.rank]
        inst.stats = result.stats
        s = result.stats
        usage = s.kv_blocks_used / max(1, s.kv_blocks_total)
        self.metrics.on_instance_stats(
            inst.instance_id, s.num_running, s.num_waiting, usage, s.num_preemptions
        )
        now = time.monotonic()
        for out in result.outputs:
            state = self.requests.get(out.request_id)
            if state is None:  # finished or aborted here already
                continue
            prev = state.last_token_time
            try:
                events = state.process(out, now)
            except Exception as e:  # this request's output only: the others go on
                logger.exception("request %s: its output could not be processed", state.request_id)
                fin = state.abort(now)
                fin.error = f"output processing failed: {type(e).__name__}: {e}"
                state.queue.put_nowait(fin)
                self._release(state, fin, notify_worker=out.finish_reason is None)
                continue
            for ev in events:
                if isinstance(ev, Delta):
                    self.metrics.on_tokens(state, len(ev.token_ids), prev, now)
                state.queue.put_nowait(ev)
            if state.finished is not None:
                stopped_here = out.finish_reason is None  # a stop string matched here
                self._release(state, state.finished, notify_worker=stopped_here)

    def _release(self, state: RequestState, fin: Finished, notify_worker: bool) -> None:
        self.requests.pop(state.request_id, None)
        inst = self.instances[state.instance_id]
        inst.live.discard(state.request_id)
        self.metrics.on_finished(state, fin)
        if notify_worker:
            inst.leader.abort.remote([state.request_id])
        if fin.reason is FinishReason.ABORT:
            logger.debug("request %s aborted", state.request_id)

    def applied_seq(self, rank: int) -> int:
        """The last step seq of worker ``rank`` whose outputs have been applied."""
        return self._next_seq[rank] - 1

    async def wait_applied(self, rank: int, seq: int, timeout_s: float = 30.0) -> None:
        """Waits until worker ``rank``'s pushes up to ``seq`` are applied (a transition waits
        for this before requests change workers, so no token arrives out of order)."""
        deadline = time.monotonic() + timeout_s
        while self.applied_seq(rank) < seq:
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker {rank}: step {seq} not applied after {timeout_s} s")
            await asyncio.sleep(0.002)

    def move_requests(self, request_ids: Iterable[str], to: Instance) -> list[str]:
        """Points live requests at instance ``to`` (a drop or restore moved them there);
        returns those that were live."""
        moved = []
        for rid in request_ids:
            state = self.requests.get(rid)
            if state is None:
                continue
            self.instances[state.instance_id].live.discard(rid)
            to.live.add(rid)
            state.instance_id = to.instance_id
            moved.append(rid)
        return moved

    async def monitor(self, interval_s: float, timeout_s: float = 30.0) -> None:
        """Samples every live instance's load each ``interval_s``; an instance whose worker
        fails to answer (dead actor, or ``timeout_s`` without a reply) is failed."""
        while True:
            live = [i for i in self.instances if i.state is not InstanceState.FAILED]
            replies = await asyncio.gather(
                *[asyncio.wait_for(_awaitable(i.leader.stats.remote()), timeout_s) for i in live],
                return_exceptions=True,
            )
            for inst, reply in zip(live, replies, strict=True):
                if isinstance(reply, BaseException):
                    logger.error("instance %d failed: %r", inst.instance_id, reply)
                    self.fail_instance(
                        inst,
                        f"worker of instance {inst.instance_id} failed: {type(reply).__name__}",
                    )
                else:
                    inst.stats = reply
            await asyncio.sleep(interval_s)

    def fail_instance(self, inst: Instance, error: str) -> None:
        """Ends every live request of an instance whose worker died (INTERNAL to their clients)."""
        inst.state = InstanceState.FAILED
        self.metrics.on_instance_state(inst.instance_id, inst.state)
        now = time.monotonic()
        for rid in list(inst.live):
            state = self.requests[rid]
            fin = state.abort(now)
            fin.error = error
            state.queue.put_nowait(fin)
            self._release(state, fin, notify_worker=False)
        for rank, waiting in self._held.items():  # pushes that came after this worker's
            if waiting:
                self._drain(rank)


async def _awaitable(ref: Any) -> Any:
    """Awaits a Ray ObjectRef (or any awaitable) inside ``asyncio.wait_for``."""
    return await ref
