"""The per-GPU (or per-CPU-slot) worker: a Ray actor whose engine loop runs in its own thread.

Actor methods only enqueue work (``add_requests``, ``abort``) and return at once; the loop
thread drains the inbox, steps the engine and pushes every step's outputs for all its requests
to the coordinator in one actor call (``push_outputs``), never once per token per request.
"""

from __future__ import annotations

import logging
import os
import socket
import statistics
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import torch

from attention.transport import connect_all_pairs
from workers.config import LOG_FORMAT, EngineConfig
from workers.engine import Engine, EngineStats, RequestSpec
from workers.scheduler import RequestOutput
from workers.stalls import (
    SLOW_STEP_S,
    allocator_retries,
    freeze_startup_heap,
    install_gc_monitor,
)
from workers.transition import GroupController, TransitionError, check_block_ownership

logger = logging.getLogger(__name__)


@dataclass
class StepResult:
    """One engine step's outputs for all its requests, plus the worker's load."""

    rank: int
    seq: int  # per-worker step counter, so the coordinator can order pushes
    outputs: list[RequestOutput]
    stats: EngineStats
    pushed_at: float = 0.0
    """Wall clock (``time.time()``) when the worker pushed it: the coordinator warns when a
    push reaches it late (workers/stalls.py). 0: unknown."""
    after: dict[int, int] | None = None
    """Apply this step only once each rank's pushes up to its seq here are applied: a drop's
    leader sets it on its first push after taking the other members' requests
    (``GroupController.drop_switch``), so no request's tokens arrive out of order."""


PROFILE_BATCHES = (1, 8, 32, 128)
"""Decode batch sizes each worker times at start-up (``WorkerInfo.decode_profile``)."""
PROFILE_PREFILL_TOKENS = 2048
"""Prompt tokens of the prefill step each worker times at start-up (at most the step budget;
256 on CPU workers)."""


@dataclass(frozen=True)
class WorkerInfo:
    rank: int
    device: str
    layer_range: tuple[int, int]
    max_model_len: int
    stats: EngineStats
    decode_profile: dict[int, float] = field(default_factory=dict)
    """Start-up profile: seconds of a decode step of the whole model by batch size
    (``ModelRunner.profile_decode``), for the planner's cost model."""
    link_bandwidth: float | None = None
    """Median one-way bandwidth to the other workers measured at start-up (bytes/s; None on
    CPU workers)."""
    prefill_tokens_per_s: float | None = None
    """Start-up profile: prompt tokens per second of one prefill step of the whole model
    (``ModelRunner.profile_prefill``), the compute the planner compares the load with."""


@dataclass
class _Inbox:
    adds: list[RequestSpec] = field(default_factory=list)
    aborts: list[str] = field(default_factory=list)


class Worker:
    """Holds one engine. Two-phase start: construct (cheap), then ``init_distributed``, then
    ``load`` (model and KV cache), then ``start`` (the loop)."""

    def __init__(
        self,
        rank: int,
        config: EngineConfig,
        coordinator: Any,
        use_gpu: bool,
        log_level: str = "INFO",
    ) -> None:
        logging.basicConfig(level=log_level, format=LOG_FORMAT)
        install_gc_monitor()
        self.rank = rank
        self.config = config
        self.coordinator = coordinator
        self.device = _pick_device(use_gpu)
        if self.device.type == "cpu":
            torch.set_num_threads(config.cpu_threads)
        self.engine: Engine | None = None
        self._inbox = _Inbox()
        self._cv = threading.Condition()
        self._stop = False
        self._seq = 0
        self._iterations = 0
        """Engine iterations ended so far (``wait_iteration``)."""
        self._busy = False
        """Whether the engine thread runs an iteration now (else it waits for work)."""
        self._thread: threading.Thread | None = None
        # Drop and restore (workers/transition.py): a transition parks the engine thread
        # between steps (pause/resume) and drives the group controller from an actor thread.
        self.group = GroupController(self)
        self._pause_requested = False
        self._parked = False
        self._parked_ready = False
        """The engine parked itself after a restore's live part (until the next resume)."""
        self.last_park_s = 0.0
        """How long the last :meth:`switch` waited for the engine to park (seconds): the end
        of the step in flight when the call came."""
        self.push_after: dict[int, int] | None = None
        """Set by a drop's leader: attached to the next push (``StepResult.after``)."""
        self.return_group = None
        """A second process group of every rank, for pipeline logits (StageTransport)."""
        self.link_bandwidth: float | None = None

    def rendezvous_address(self) -> str:
        """``tcp://ip:port`` on this worker's node with a free port (call on rank 0)."""
        ip = _node_ip()
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return f"tcp://{ip}:{port}"

    def init_distributed(self, init_method: str, world_size: int) -> None:
        """Joins the workers' process group (NCCL on CUDA, gloo on CPU): call on all at once."""
        import torch.distributed as dist

        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend, init_method=init_method, world_size=world_size, rank=self.rank
        )
        probe = torch.ones(1, device=self.device)
        dist.all_reduce(probe)
        if int(probe.item()) != world_size:
            raise RuntimeError(f"process group check failed: all_reduce gave {probe.item()}")
        bandwidth = connect_all_pairs(self.rank, world_size, self.device)
        self.link_bandwidth = statistics.median(bandwidth.values()) if bandwidth else None
        if world_size > 1:  # pipeline logits travel back on their own communicator
            self.return_group = dist.new_group(list(range(world_size)))
            connect_all_pairs(self.rank, world_size, self.device, self.return_group)

    def load(self) -> WorkerInfo:
        self.engine = Engine(self.config, self.device)
        runner = self.engine.runner
        sched = self.config.scheduler
        batches = [b for b in PROFILE_BATCHES if b <= sched.max_num_seqs]
        prefill = min(
            PROFILE_PREFILL_TOKENS, sched.max_num_batched_tokens, self.engine.max_model_len
        )
        if self.device.type == "cpu":  # a CPU step of a real model at batch 128 takes seconds
            batches, prefill = batches[:2], min(prefill, 256)
        prefill_s = runner.profile_prefill(prefill)
        return WorkerInfo(
            rank=self.rank,
            device=_describe(self.device),
            layer_range=(runner.model.start, runner.model.end),
            max_model_len=self.engine.max_model_len,
            stats=self.engine.stats(),
            decode_profile=runner.profile_decode(batches),
            link_bandwidth=self.link_bandwidth,
            prefill_tokens_per_s=prefill / prefill_s if prefill_s > 0 else None,
        )

    def start(self) -> None:
        logger.debug("worker %d: %d start-up objects frozen", self.rank, freeze_startup_heap())
        self._thread = threading.Thread(target=self._loop, name=f"engine-{self.rank}", daemon=True)
        self._thread.start()

    def add_requests(self, specs: list[RequestSpec]) -> None:
        with self._cv:
            self._inbox.adds.extend(specs)
            self._cv.notify()

    def abort(self, request_ids: list[str]) -> None:
        with self._cv:
            self._inbox.aborts.extend(request_ids)
            self._cv.notify()

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def check_integrity(self) -> bool:
        """Runs the block pool's invariant check and checks that the running requests hold
        exactly the used blocks (tests call it when the worker is idle)."""
        with self._cv:
            check_block_ownership(self.engine)
        return True

    # --- transitions (drop / restore): see workers/transition.py ---------------------------

    def pause(self) -> int:
        """Parks the engine thread between steps; returns the seq of its last pushed step, so
        the coordinator can wait until it has applied every push before moving requests."""
        with self._cv:
            self._pause_requested = True
            self._cv.notify_all()
            while not self._parked and not self._stop:
                self._cv.wait()
            return self._seq

    def resume(self) -> None:
        with self._cv:
            self._pause_requested = False
            self._parked_ready = False
            self._cv.notify_all()

    def wait_restore_ready(self, timeout_s: float) -> bool:
        """Blocks until the engine thread has parked itself because a restore's live part is
        done (``_park_if_gathered``), or ``timeout_s`` passes; returns whether it has. The
        coordinator waits on this rather than polling, so the split starts as the last live
        step ends."""
        with self._cv:
            self._cv.wait_for(
                lambda: (self._parked_ready and self._parked) or self._stop, timeout_s
            )
            return self._parked_ready and self._parked

    def iteration(self) -> int:
        """A mark for :meth:`wait_iteration`: the engine iteration running now (or next)."""
        with self._cv:
            return self._iterations

    def wait_iteration(self, mark: int, timeout_s: float) -> bool:
        """Blocks until the engine iteration that was running at ``mark`` (if any) has ended,
        or ``timeout_s`` passes; returns whether it has."""
        with self._cv:
            return self._cv.wait_for(
                lambda: self._iterations > mark or not self._busy or self._stop, timeout_s
            )

    def transition(self, step: str, *args: Any) -> Any:
        """Runs one step of a drop or restore (``GroupController.STEPS``) while parked;
        ``drop_stage`` runs while the engine serves."""
        return self.group.call(step, *args)

    @property
    def last_seq(self) -> int:
        """The seq of this worker's last pushed step."""
        return self._seq

    def switch(self, step: str, *args: Any) -> Any:
        """:meth:`pause`, :meth:`transition` ``step`` and :meth:`resume` in one call: a
        transition whose members coordinate among themselves (``drop_switch``). Resumes also
        when the step raises TransitionError (it changed nothing); anything else leaves the
        engine parked (the coordinator fails the group)."""
        start = time.perf_counter()
        self.pause()
        self.last_park_s = time.perf_counter() - start
        try:
            return self.finish_parked(step, *args)
        except TransitionError:
            self.resume()
            raise

    def finish_parked(self, step: str, *args: Any) -> Any:
        """:meth:`transition` ``step`` while parked, then :meth:`resume` once it returns (one
        coordinator round fewer while requests wait: a transition's last step). Raises what
        the step raised, leaving the engine parked (the coordinator fails the group)."""
        result = self.transition(step, *args)
        self.resume()
        return result

    def run_parked(self, step: str, *args: Any) -> Any:
        """:meth:`pause`, :meth:`transition` ``step`` and :meth:`resume` in one call (one
        coordinator round trip, not three, while requests wait); resumes whether the step
        raised or not."""
        self.pause()
        try:
            return self.transition(step, *args)
        finally:
            self.resume()

    def drain_inbox(self) -> None:
        """Applies queued adds and aborts now (a transition exports the result)."""
        with self._cv:
            inbox, self._inbox = self._inbox, _Inbox()
        self._apply(inbox)

    def _ready(self) -> bool:
        """Under ``_cv``: whether the engine thread has something to do; parks it while a
        transition holds the worker."""
        if self._pause_requested and not self.engine.in_flight:
            if not self._parked:
                self._parked = True
                self._cv.notify_all()
            return False
        self._parked = False
        inbox = self._inbox.adds or self._inbox.aborts
        return bool(self.group.stage_loop is not None or inbox or self.engine.has_work)

    def shutdown(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _take_inbox(self) -> _Inbox | None:
        with self._cv:
            self._busy = False
            while not self._stop and not self._ready():
                self._cv.wait()
            if self._stop:
                return None
            self._busy = True
            if self.group.stage_loop is not None:  # requests wait until the pipeline stops
                return _Inbox()
            inbox, self._inbox = self._inbox, _Inbox()
            return inbox

    def _loop(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        while (inbox := self._take_inbox()) is not None:
            if self.group.stage_loop is not None:
                self.group.run_stage_loop()  # a pipeline stage: until the leader sends STOP
                continue
            start = time.perf_counter()
            self.engine.clock.reset()
            with self.engine.clock.phase("inbox"):
                outputs = self._apply(inbox)
            if self.engine.has_work:
                outputs += self._step()
            with self._cv:  # wait_iteration
                self._iterations += 1
                self._cv.notify_all()
            if outputs:
                with self.engine.clock.phase("push"):
                    self._push(outputs)
            self._park_if_gathered()
            if time.perf_counter() - start > SLOW_STEP_S:
                self._report_slow(time.perf_counter() - start)

    def _report_slow(self, seconds: float) -> None:
        """Warns of an engine iteration longer than ``SLOW_STEP_S``, naming its phases, its
        step and the allocator's retries so far (workers/stalls.py; read only here: the
        allocator's statistics cost too much to read every step)."""
        engine = self.engine
        step_s, step_tokens = engine.last_step
        logger.warning(
            "worker %d: engine iteration took %.0f ms (%s); last step %d tokens in %.0f ms, "
            "%d running, %d waiting, %d in flight, %d allocator retries so far",
            self.rank,
            1e3 * seconds,
            engine.clock.describe(),
            step_tokens,
            1e3 * step_s,
            len(engine.scheduler.running),
            len(engine.scheduler.waiting),
            len(engine.in_flight),
            allocator_retries(self.device),
        )

    def _park_if_gathered(self) -> None:
        """A restore's live part is done (KV gathered, weights refilled): park now, as a
        pause would, so the coordinator's split starts without waiting out one more step
        (workers/transition.py, restore_begin)."""
        group, engine = self.group, self.engine
        if group.park_when_gathered and not engine.in_flight and engine.restore_ready():
            group.park_when_gathered = False
            with self._cv:
                self._pause_requested = self._parked_ready = True

    def _apply(self, inbox: _Inbox) -> list[RequestOutput]:
        for spec in inbox.adds:
            self.engine.add_request(spec)
        outputs = []
        for rid in inbox.aborts:
            out = self.engine.abort(rid)
            if out is not None:
                outputs.append(out)
        return outputs

    def _step(self) -> list[RequestOutput]:
        try:
            if self._pause_requested:  # a transition waits: collect what is in flight
                return self.engine.drain()
            return self.engine.step()
        except Exception:  # an engine fault: end this worker's requests, keep serving
            err = traceback.format_exc()
            logger.error("engine step failed on worker %d:\n%s", self.rank, err)
            return self.engine.fail_all(err.strip().splitlines()[-1])

    def _push(self, outputs: list[RequestOutput]) -> None:
        self._seq += 1
        result = StepResult(self.rank, self._seq, outputs, self.engine.stats(), time.time())
        result.after, self.push_after = self.push_after, None
        self.coordinator.push_outputs.remote(result)


def _pick_device(use_gpu: bool) -> torch.device:
    """The configured device: a CPU worker stays on the CPU even where GPUs are visible."""
    if not use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("a GPU worker was placed where CUDA is not available")
    return torch.device("cuda", 0)  # Ray narrows CUDA_VISIBLE_DEVICES to this actor's GPU


def _describe(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def _node_ip() -> str:
    try:
        import ray

        return ray.util.get_node_ip_address()
    except Exception:
        return "127.0.0.1"
