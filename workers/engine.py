"""One instance's engine: schedule -> execute -> update, one step at a time.

The engine is tokenizer-free (vLLM v1's engine core): it takes prompt token ids and returns
token ids; detokenization and stop strings happen in the coordinator.

A pipeline group's leader (its runner a :class:`~workers.pipeline.PipelineRunner` that
overlaps micro-batches) keeps several micro-batches in flight: each :meth:`Engine.step`
collects the oldest once that many fly, then launches one more (disjoint from those still in
flight), so stage r computes micro-batch k while stage r+1 computes k-1 (KunServe §3(c);
vLLM's pipeline-parallel virtual engines).

It launches the next micro-batch before it reads back the tokens of the one it collects
(vLLM's async scheduling): the collected step is applied with placeholder tokens
(``Scheduler.advance``), the next one is scheduled and launched with those tokens fed to it
on the device, and only then are they read and the step's outputs made
(``Scheduler.resolve``). So the leader's host work between two micro-batches (reading the
tokens, updating, scheduling, preparing) overlaps stage 0's compute instead of leaving it
idle: 2.9 ms before each 13.4 ms prompt micro-batch on 2 H200s (docs/benchmarks.md, session
19). A request that stops on a sampled token (EOS) has one more token computed, unused.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from planner.drop_plan import stage_layer_ranges
from workers.block_pool import BlockPool, KVCacheManager
from workers.config import EngineConfig, load_eos_token_ids
from workers.model_runner import ModelRunner
from workers.request import Request, RequestStatus, SamplingParams
from workers.sampler import SampledTokens
from workers.scheduler import RequestOutput, Scheduler, SchedulerOutput
from workers.stage_memory import capture_stage_graphs
from workers.stalls import PhaseClock

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RequestSpec:
    """What the coordinator sends a worker for a new, already validated request."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    max_tokens: int


@dataclass(frozen=True)
class EngineStats:
    """Load snapshot, sent with every step's outputs."""

    num_running: int
    num_waiting: int
    kv_blocks_total: int
    kv_blocks_used: int
    kv_block_bytes: int
    kv_demand_blocks: int
    num_preemptions: int
    step_time_s: float = 0.0
    num_step_tokens: int = 0
    waiting_demand_blocks: int = 0
    """The part of ``kv_demand_blocks`` the waiting queue needs (blocks)."""
    step_token_fill: float = 0.0
    """Share of the step token budget (``max_num_batched_tokens``, or the pipeline budget while
    leading a group) recent steps used: an
    exponential average, each step weighing ``FILL_WEIGHT`` (the planner's compute-bound test)."""
    num_to_gather: int = 0
    """Running requests whose KV a live restore has not gathered onto one home yet."""
    weight_bytes_to_refill: int = 0
    """Weight bytes a live restore has still to copy while the group serves (0 when it
    refills none: the split copies them)."""
    tokens_computed: int = 0
    """Tokens (prefill and decode) the engine's steps have computed since it started: its
    rate over time is the load the planner sets beside the worker's profiled peak."""


FILL_WEIGHT = 0.2
"""Weight of the latest step in ``EngineStats.step_token_fill`` (about the last 5 steps)."""

HELD_STEP_TOKENS = 256
"""Most tokens of a step with no decode while prompts are held (``Engine.hold_prompts``): a
short step, so that a member with only prompts to run does not keep the others' decoders
waiting at the drop's park, nor sit idle."""


class Engine:
    def __init__(
        self, config: EngineConfig, device: torch.device, layer_range: tuple[int, int] | None = None
    ) -> None:
        self.config = config
        self.runner = ModelRunner(config, device, layer_range)
        self.max_model_len = self.runner.max_model_len
        self.eos_token_ids = load_eos_token_ids(config.model_path)
        self._init_kv_cache()
        self.scheduler = Scheduler(config.scheduler, self.kv, self.max_model_len)
        self._last_step = (0.0, 0)
        self._fill = 0.0
        self._tokens_computed = 0
        self.in_flight: deque[tuple[SchedulerOutput, float]] = deque()
        """Launched, not yet collected micro-batches (pipeline mode), oldest first, with the
        time each was launched."""
        self.clock = PhaseClock()
        """Phases of the current iteration (the worker reports a slow one, workers/stalls.py)."""
        self.hold_until = 0.0
        """``time.monotonic()`` until which steps stay short (:meth:`hold_prompts`)."""

    def _init_kv_cache(self) -> None:
        """Sizes and allocates the KV cache and captures the CUDA graphs. Where the KV cache
        is sized from ``gpu_memory_utilization`` on VMM memory, the graphs are captured first
        and the device memory they take comes out of the KV cache's share: the KV range's
        base never moves, so graphs captured over a few blocks stay valid as it grows
        (``ModelRunner.graph_kv_cache``). Elsewhere the graphs are captured after (on the
        torch allocator they record the final KV tensor's address), and their memory is
        logged but not counted."""
        runner, cache = self.runner, self.config.cache
        num_blocks = runner.determine_num_blocks()
        need = -(-self.max_model_len // cache.block_size)
        graphs_first = (
            runner.memory is not None
            and runner.device.type == "cuda"
            and cache.num_kv_blocks is None
            and num_blocks >= need
        )
        if graphs_first:
            runner.allocate_kv_cache(need)
            graph_bytes = self._capture_graphs()
            num_blocks -= -(-graph_bytes // runner.block_bytes)
            logger.info(
                "KV cache: sized after the CUDA graphs, whose %.0f MiB it gives up",
                graph_bytes / 2**20,
            )
        if num_blocks < need:
            raise ValueError(
                f"KV cache of {num_blocks} blocks cannot hold one request of max_model_len "
                f"{self.max_model_len} ({need} blocks): raise gpu_memory_utilization or "
                "num_kv_blocks, or lower max_model_len"
            )
        self.runner.allocate_kv_cache(num_blocks)
        # VMM: the KV pool's own block pool, so capacity changes (drop / restore) reach the
        # scheduler; it may hold a few more blocks than asked (whole 2 MiB slots).
        memory = self.runner.memory
        self.pool = BlockPool(num_blocks) if memory is None else memory.kv.block_pool
        self.kv = KVCacheManager(self.pool, self.config.cache.block_size)
        logger.info(
            "KV cache: %d blocks of %d tokens, %.1f MiB",
            self.pool.num_blocks,
            self.config.cache.block_size,
            self.pool.num_blocks * self.runner.block_bytes / 2**20,
        )
        if not graphs_first:
            self._capture_graphs()

    def _capture_graphs(self) -> int:
        """Compiles the attention kernels' variants and captures the decode and piecewise
        graphs (and, with ``stage_graphs_at_start``, every stage's); returns the device
        memory that took (bytes, ``torch.cuda.mem_get_info``; 0 off CUDA)."""
        runner, free = self.runner, self.runner.device_free_bytes()
        runner.warm_up_kernels()
        runner.capture_cuda_graphs()
        if self.config.stage_graphs_at_start:
            self._capture_stage_graphs(self.config.stage_graphs_at_start)
        return max(0, free - runner.device_free_bytes())

    def _capture_stage_graphs(self, group_size: int) -> None:
        """The decode and piecewise graphs of every stage of a ``group_size``-stage drop,
        captured now (workers/stage_memory.py, ``capture_stage_graphs``)."""
        start, free = time.perf_counter(), self.runner.device_free_bytes()
        ranges = stage_layer_ranges(self.runner.model.cfg.num_layers, group_size)
        n = capture_stage_graphs(self.runner, ranges)
        if n:
            logger.info(
                "CUDA graphs: captured %d sizes (decode batches and piecewise token counts) "
                "of the stages %s in %.1f s, %.0f MiB of device memory",
                n,
                ranges,
                time.perf_counter() - start,
                (free - self.runner.device_free_bytes()) / 2**20,
            )

    def add_request(self, spec: RequestSpec) -> None:
        self.scheduler.add(
            Request(
                request_id=spec.request_id,
                prompt_token_ids=list(spec.prompt_token_ids),
                sampling=spec.sampling,
                max_tokens=spec.max_tokens,
                eos_token_ids=self.eos_token_ids,
            )
        )

    def close(self) -> None:
        """Releases the runner's device memory (VMM chunks, graphs, KV cache); the engine
        cannot step again."""
        self.runner.close()

    def abort(self, request_id: str) -> RequestOutput | None:
        self.runner.sampler.forget(request_id)
        return self.scheduler.abort(request_id)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work or bool(self.in_flight)

    def step(self) -> list[RequestOutput]:
        """Schedules and runs one batch; returns the outputs of requests that sampled. With
        micro-batches in flight (module docstring): launches one or collects the oldest."""
        depth = self._overlap_depth()
        if depth > 1:
            return self._step_overlapped(depth)
        outputs = self.drain()  # steps that run alone wait for those in flight
        start = time.perf_counter()
        with self.clock.phase("schedule"):
            budget, decodes_only = self._token_budget(), False
            if self.hold_until and time.monotonic() < self.hold_until:  # hold_prompts
                decodes_only = any(r.num_pending_tokens == 1 for r in self.scheduler.running)
                if not decodes_only:  # prompts alone: a few of their tokens
                    budget = min(budget, HELD_STEP_TOKENS)
            out = self.scheduler.schedule(
                token_budget=budget,
                admit=self._admits(),
                decodes_only=decodes_only,
                **self._chunk_cost(),
            )
        if out.is_empty:
            return outputs
        with self.clock.phase("execute"):
            sampled, logprobs = self.runner.execute(out)
        with self.clock.phase("update"):
            outputs += self._update(out, sampled, logprobs)
        self._record_step(time.perf_counter() - start, out.num_tokens)
        return outputs

    def drain(self) -> list[RequestOutput]:
        """Collects every micro-batch in flight (before a pause, or a step that runs alone);
        returns their outputs."""
        outputs: list[RequestOutput] = []
        while self.in_flight:
            outputs += self._collect()
        return outputs

    def _token_budget(self) -> int:
        """Tokens per step: the pipeline budget while this engine leads a pipeline group."""
        sched = self.config.scheduler
        if getattr(self.runner, "overlap_depth", None) is None:
            return sched.max_num_batched_tokens
        return sched.pipeline_token_budget

    def _chunk_cost(self) -> dict[str, Any]:
        """``Scheduler.schedule``'s chunk-cost arguments: none (tokens count) unless this
        engine leads a pipeline group with ``pipeline_chunk_cost="attention"``; then the
        model's break-even context and, with the stage's piecewise graphs, the size they run
        a micro-batch at (their next captured one; None past the largest)."""
        if getattr(self.runner, "overlap_depth", None) is None:
            return {}
        if self.config.scheduler.pipeline_chunk_cost != "attention":
            return {}
        graphs = getattr(self.runner, "graphs", None)
        pieces = None if graphs is None else getattr(graphs, "piecewise", None)
        return {
            "break_even": self.runner.model_config.attention_break_even,
            "padded_size": None if pieces is None else pieces.size_for,
        }

    def hold_prompts(self, seconds: float) -> None:
        """For the next ``seconds`` (0: from now on no more), steps stay short: one where some
        running request decodes runs only the decodes (no prompt chunk, no new request),
        another at most :data:`HELD_STEP_TOKENS` prompt tokens. A drop is about to park this
        engine (``GroupController.drop_stage``): every member then parks after a short step,
        and none waits out another's long prompt step while its own requests wait for a
        token (a mixed step of the code burst ran 30-160 ms on 2 H200s). The prompts go on
        once the group serves, with the KV the drop frees."""
        self.hold_until = time.monotonic() + seconds if seconds > 0 else 0.0

    def _admits(self) -> bool:
        """Whether the next step may start waiting requests: not a pipeline group's first
        step after a drop (``PipelineRunner.holds_prompts``)."""
        return not getattr(self.runner, "holds_prompts", False)

    def _overlap_depth(self) -> int:
        """Micro-batches to keep in flight now: the runner's, when it can overlap them."""
        overlap = getattr(self.runner, "overlap_depth", None)
        return 1 if overlap is None else overlap()

    def _step_overlapped(self, depth: int) -> list[RequestOutput]:
        """Once ``depth`` micro-batches are in flight, samples the oldest on the device and
        applies it with placeholder tokens; then schedules and launches the next one (its
        requests include those just sampled, their tokens fed on the device); then reads the
        sampled tokens back and returns their outputs (module docstring). The worker pushes
        the outputs and reads its inbox after this returns, while the stages compute."""
        collected = self._begin_collect() if len(self.in_flight) >= depth else None
        busy = {s.request.request_id for o, _ in self.in_flight for s in o.scheduled}
        with self.clock.phase("schedule"):  # the decodes spread over the micro-batches
            out = self.scheduler.schedule(busy, depth, self._token_budget(), **self._chunk_cost())
        if not out.is_empty:
            with self.clock.phase("launch"):
                self.runner.launch(out, None if collected is None else collected[2])
            self.in_flight.append((out, time.perf_counter()))
        if collected is not None:
            return self._finish_collect(*collected)
        if out.is_empty and self.in_flight:  # nothing to launch: make progress
            return self._collect()
        return []

    def _collect(self) -> list[RequestOutput]:
        return self._finish_collect(*self._begin_collect())

    def _begin_collect(self) -> tuple[SchedulerOutput, float, SampledTokens]:
        """Samples the oldest micro-batch in flight on the device and applies it with
        placeholder tokens (``Scheduler.advance``)."""
        out, launched = self.in_flight.popleft()
        with self.clock.phase("collect"):
            sampled = self.runner.collect_async(out)
        self.scheduler.advance(out)
        return out, launched, sampled

    def _finish_collect(
        self, out: SchedulerOutput, launched: float, sampled: SampledTokens
    ) -> list[RequestOutput]:
        """Reads the tokens of a step begun by :meth:`_begin_collect` back and resolves it."""
        with self.clock.phase("collect"):
            tokens, logprobs = sampled.by_request()
        with self.clock.phase("update"):
            outputs = self.scheduler.resolve(out, tokens, logprobs)
            self._forget_finished(out)
        self._record_step(time.perf_counter() - launched, out.num_tokens)
        return outputs

    @property
    def last_step(self) -> tuple[float, int]:
        """(seconds, tokens) of the last step run or collected."""
        return self._last_step

    def _record_step(self, seconds: float, num_tokens: int) -> None:
        self._last_step = (seconds, num_tokens)
        self._tokens_computed += num_tokens
        fill = min(1.0, num_tokens / self._token_budget())
        self._fill += FILL_WEIGHT * (fill - self._fill)

    def _update(
        self, out: SchedulerOutput, sampled: dict[str, int], logprobs: dict
    ) -> list[RequestOutput]:
        outputs = self.scheduler.update(out, sampled, logprobs)
        self._forget_finished(out)
        return outputs

    def _forget_finished(self, out: SchedulerOutput) -> None:
        for s in out.scheduled:  # finished here, or aborted while its micro-batch flew
            if s.request.status is RequestStatus.FINISHED:
                self.runner.sampler.forget(s.request.request_id)

    def fail_all(self, error: str) -> list[RequestOutput]:
        """Aborts every request after an engine fault, freeing all blocks; outputs carry it."""
        self.in_flight.clear()
        abandon = getattr(self.runner, "abandon_launched", None)
        if abandon is not None:
            abandon()
        ids = [r.request_id for r in (*self.scheduler.running, *self.scheduler.waiting)]
        outputs = [o for o in (self.abort(i) for i in ids) if o is not None]
        for o in outputs:
            o.error = error
        return outputs

    def stats(self) -> EngineStats:
        step_time, step_tokens = self._last_step
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_blocks_total=self.pool.num_blocks,
            kv_blocks_used=self.pool.num_used,
            kv_block_bytes=self.runner.block_bytes,
            kv_demand_blocks=self.scheduler.kv_demand_blocks(),
            num_preemptions=self.scheduler.num_preemptions,
            step_time_s=step_time,
            num_step_tokens=step_tokens,
            waiting_demand_blocks=self.scheduler.waiting_demand_blocks(),
            step_token_fill=self._fill,
            num_to_gather=self.num_to_gather(),
            weight_bytes_to_refill=self.weight_bytes_to_refill(),
            tokens_computed=self._tokens_computed,
        )

    def weight_bytes_to_refill(self) -> int:
        """Weight bytes a live restore still refills while the group serves
        (workers/weight_exchange.py); 0 outside one."""
        prefetch = getattr(self.runner, "prefetch", None)
        return 0 if prefetch is None else prefetch.bytes_left

    def restore_ready(self) -> bool:
        """Whether a live restore has nothing left to do while serving: every running
        request's KV is home and the weights are refilled, or no request runs (nothing steps
        the refill; the split copies what is left)."""
        if self.num_to_gather():
            return False
        return not self.scheduler.running or self.weight_bytes_to_refill() == 0

    def num_to_gather(self) -> int:
        """Running requests whose KV a restore still has to gather onto one home (0 unless a
        pipeline group's restore is gathering, workers/remote_attention.py)."""
        kv = self.kv
        if getattr(kv, "gather_homes", None) is None:
            return 0
        return sum(not kv.is_home(r.request_id) for r in list(self.scheduler.running))
