"""Pipeline stages of a dropped group: stage models, the leader's step, the stage loop.

After a drop (KunServe §3(a)-(b), reference/kunserve.md), stage r of a g-stage group keeps
decoder layers ``[start_r, end_r)``; stage 0 keeps the embedding, the last stage the final
norm and LM head. The leader (stage 0) runs the group's scheduler; per engine step it sends
every stage the step header (and, while pre-drop requests remain, the step plan of
workers/remote_attention.py), runs its layers and sends the micro-batch to stage 1
(:class:`PipelineRunner`); every other stage runs :class:`StageLoop` in its engine thread:
receive, run its layers, forward to the next stage or, on the last, compute the sampling rows'
logits and send them back to the leader, which samples; sampling state stays on the leader.
Once no pre-drop request is left, several micro-batches are in flight
(:meth:`PipelineRunner.overlap_depth`), and the leader launches the next one before it reads
back the tokens of the one it collects (workers/engine.py).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from attention.metadata import host_tensor
from attention.transport import StageInputs, StageOp, StageTransport, StepHeader, wait_sends
from kernels.paged_prefill import causal_pairs
from workers import envs, kv_exchange
from workers.cuda_graphs import capture_sizes, graph_blocker, graph_key
from workers.forward_context import ForwardContext, set_forward_context
from workers.models.llama import LlamaModel
from workers.piecewise_graphs import piecewise_max_tokens
from workers.remote_attention import GroupKVManager, GroupLayout, RemoteAttention, StepPlan
from workers.sampler import SampledTokens, TokenLogprobs
from workers.scheduler import ScheduledRequest, SchedulerOutput
from workers.stage_graphs import StageGraphs
from workers.stalls import GC_TOTALS, SLOW_STEP_S, ComputeTimeline, PhaseClock, PhaseTotals
from workers.step_profiler import StepProfiler
from workers.weight_exchange import WeightCopy, WeightPrefetch

logger = logging.getLogger(__name__)

Refill = Callable[[Sequence[WeightCopy]], int]
"""Runs a step's weight copies on this stage; returns the bytes it received."""

_LOGGED_STEPS = 8
"""Every stage logs its first pipelined steps at info, by phase: they carry a drop's token
gap."""


def _step_clock(device: torch.device, step: int) -> PhaseClock:
    """The phase clock of pipelined step ``step`` (0-based): host time, or, for the first
    :data:`_LOGGED_STEPS` with ``KUNSERVE_SYNC_STEP_PHASES=1`` (workers/envs.py), synced to
    the device before each mark, so each phase owns its GPU work."""
    synced = step < _LOGGED_STEPS and device.type == "cuda" and envs.sync_step_phases()
    return PhaseClock((lambda: torch.cuda.synchronize(device)) if synced else None)


# --- stage models -----------------------------------------------------------------------


def param_bytes(module: nn.Module | None) -> int:
    """Bytes of a module's parameters (0 for None)."""
    return 0 if module is None else sum(p.numel() * p.element_size() for p in module.parameters())


def dropped_param_bytes(model: LlamaModel, layer_range: tuple[int, int]) -> int:
    """Parameter bytes ``model`` frees when it keeps only ``layer_range`` (bytes): the layers
    outside it, the embedding unless the range is first, the norm and LM head unless it is last.
    A tied LM head is its own copy of the embedding here, so the last stage frees the embedding
    and keeps the head."""
    start, end = layer_range
    keep = range(start, end)
    freed = sum(param_bytes(m) for j, m in _layers_by_index(model) if j not in keep)
    if start != 0:
        freed += param_bytes(model.embed_tokens)
    if end != model.cfg.num_layers:
        freed += param_bytes(model.norm) + param_bytes(model.lm_head)
    return freed


def _layers_by_index(model: LlamaModel) -> Iterator[tuple[int, nn.Module]]:
    """(global layer index, layer module) of every layer ``model`` holds."""
    for i, layer in enumerate(model.layers):
        yield model.start + i, layer


def empty_model(model: LlamaModel, layer_range: tuple[int, int]) -> LlamaModel:
    """A model for ``layer_range`` of the same config and backend, with every parameter on the
    meta device (no memory) and the RoPE table taken from ``model``."""
    backend = model.layers[0].self_attn.backend
    with torch.device("meta"):
        out = LlamaModel(model.cfg, backend, layer_range, model.max_positions)
    out.cos_sin_cache = model.cos_sin_cache
    return out


def adopt_layer(model: LlamaModel, index: int, layer: nn.Module) -> None:
    """Puts decoder layer ``index`` (global) into ``model``, re-pointing its attention at its
    slot inside ``model``'s KV block (``index - model.start``)."""
    local = index - model.start
    layer.self_attn.local_layer = local
    model.layers[local] = layer


def point_layers_at_kv_slots(model: LlamaModel) -> None:
    """Points each decoder layer of ``model`` at its slot in ``model``'s KV blocks (its index
    in ``model.layers``). A stage model shares its layers with the full model it came from,
    so whichever of the two runs next is re-pointed first."""
    for local, layer in enumerate(model.layers):
        layer.self_attn.local_layer = local


def build_stage_model(
    model: LlamaModel, layer_range: tuple[int, int], point: bool = True
) -> tuple[LlamaModel, int]:
    """Moves the kept modules of ``model`` into a new model for ``layer_range`` (no reload, no
    copy); the rest is left to be freed with ``model``. Returns (stage model, freed bytes).
    ``point=False`` leaves the kept layers pointed at their KV slots in ``model`` (a drop
    staged while ``model`` still serves; :func:`point_layers_at_kv_slots` before the stage
    model runs).

    Raises ValueError when ``layer_range`` is not inside what ``model`` holds.
    """
    start, end = layer_range
    if not model.start <= start < end <= model.end:
        raise ValueError(f"[{start}, {end}) is not inside [{model.start}, {model.end})")
    freed = dropped_param_bytes(model, layer_range)
    kept = [layer for j, layer in _layers_by_index(model) if start <= j < end]
    stage = LlamaModel.of_modules(
        model.cfg,
        layer_range,
        kept,
        model.embed_tokens,
        model.norm,
        model.lm_head,
        model.max_positions,
        model.cos_sin_cache,
    )
    if point:
        point_layers_at_kv_slots(stage)
    check_materialized(stage)
    return stage.eval(), freed


def check_materialized(model: LlamaModel) -> None:
    """Raises RuntimeError naming parameters still on the meta device."""
    meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if meta:
        raise RuntimeError(f"stage model has parameters left on meta: {meta[:4]}")


# --- one stage's compute ------------------------------------------------------------------


def run_stage(
    model: LlamaModel,
    kv_cache: torch.Tensor,
    x: StageInputs | None,
    router: RemoteAttention | None = None,
    **first: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Runs ``model``'s layers over one micro-batch with its own KV cache.

    The first stage passes ``input_ids``, ``positions`` and ``meta`` as keywords (x is None);
    later stages pass the received :class:`StageInputs`. ``router`` routes the attention of
    pre-drop requests (workers/remote_attention.py). Returns (hidden, residual), each
    [num_tokens, hidden_size]; on the last stage hidden is the final-norm output.
    """
    if x is None:
        meta, positions = first["meta"], first["positions"]
        kwargs = {"input_ids": first["input_ids"]}
    else:
        meta, positions = x.meta, x.positions
        kwargs = {"hidden": x.hidden, "residual": x.residual}
    with set_forward_context(ForwardContext(meta, kv_cache, router)):
        return model(positions, **kwargs)


def stage_graphs_for(
    runner: Any,
    replay_eagerly: bool = False,
    model: LlamaModel | None = None,
    kv_cache: torch.Tensor | None = None,
) -> StageGraphs | None:
    """Decode graphs for a stage of ``runner`` (its current model and KV view, or ``model`` over
    ``kv_cache``), when its device, backend and config allow graphs (workers/cuda_graphs
    .graph_blocker; ``replay_eagerly`` skips that check for tests on CPU), else None.

    The runner keeps them (``stage_graphs``, by layer range): a later drop to the same range
    gets the same graphs back when its stage model and KV view have the same
    :func:`stage_graph_key`, with every size captured so far (and the sizes captured at
    start-up, :func:`workers.stage_memory.capture_stage_graphs`)."""
    cfg = getattr(runner, "config", None)
    if cfg is None:
        return None
    if not replay_eagerly:
        reason = graph_blocker(runner.device, cfg.enforce_eager, runner.backend.name, True)
        if reason is not None:
            return None
    model = runner.model if model is None else model
    kv_cache = runner.kv_cache if kv_cache is None else kv_cache
    kept = getattr(runner, "stage_graphs", None)
    key = stage_graph_key(model, kv_cache)
    hit = None if kept is None else kept.get((model.start, model.end))
    if hit is not None and hit[0] == key:
        graphs = hit[1]
        graphs.rebind(model, kv_cache)
        logger.info(
            "stage layers [%d, %d): decode graphs kept (%d sizes captured)",
            model.start,
            model.end,
            len(graphs.graphs),
        )
        return graphs
    sched = cfg.scheduler
    max_batch = capture_sizes(sched.max_num_seqs, sched.max_num_batched_tokens)[-1]
    width = -(-runner.max_model_len // runner.block_size)
    piecewise = piecewise_max_tokens(sched, stage=True)
    pool = getattr(runner, "graph_pool", None)
    graphs = StageGraphs(model, kv_cache, width, max_batch, replay_eagerly, piecewise, pool)
    if kept is not None:
        kept[(model.start, model.end)] = (key, graphs)
    return graphs


def stage_graph_key(model: LlamaModel, kv_cache: torch.Tensor) -> tuple:
    """:func:`~workers.cuda_graphs.graph_key` of a stage's decode graphs, without the KV view's
    block count: a view of the stage's layer count over the same base grows with a drop (more
    blocks, same strides), and the graphs read blocks only through their tables."""
    params, (ptr, shape, stride, dtype) = graph_key(model, kv_cache)
    return params, (ptr, shape[1:], stride, dtype)


class _Stage:
    """What the leader and the other stages share: the group's layout, this stage's place in
    it, the step plan's KV moves and its remote-attention router."""

    def __init__(
        self,
        runner: Any,
        transport: StageTransport,
        layout: GroupLayout,
        stage: int,
        legacy_view: torch.Tensor | None,
        refill: Refill | None = None,
    ) -> None:
        self.runner = runner
        self.transport = transport
        self.layout = layout
        self.stage = stage
        self.legacy_view = legacy_view
        """This worker's KV bytes as L-layer blocks, where pre-drop requests' KV lives."""
        self.refill = refill
        """Runs a step's weight copies of a live restore (``StageMemory.prefetch`` bound to
        this stage); None where the memory cannot refill weights before a restore."""
        self.counters: Counter = Counter()
        """Pre-drop traffic: ``moved`` KV slices this worker sent or received in the
        exchange, and RemoteAttention's ``sent``, ``served`` and ``home`` layer calls."""
        self.graphs = stage_graphs_for(runner)
        """Decode graphs of this stage (None: every step runs eagerly)."""
        self.profiler = StepProfiler(f"stage {stage}", runner.device)
        self.totals = PhaseTotals()
        """The phases of its steady steps (after the first logged ones, with no KV moves or
        remote attention), summed for the mean step logged at :meth:`log_totals`."""
        self.timeline = ComputeTimeline(runner.device, trace=envs.stage_trace_dir() is not None)
        """When this stage's device computed its micro-batches and idled between them."""
        self._started = time.perf_counter()
        self._gc_before = GC_TOTALS.copy()

    def log_totals(self) -> None:
        """Logs the mean steady step's phases (host time) and the device's compute and idle
        time per micro-batch (:class:`~workers.stalls.ComputeTimeline`). The leader's
        ``in flight`` and the other stages' ``header wait`` hold the wait for the other
        stages: the engine reads a step's sampled tokens back between its launch and its
        collect (``sample`` only queues the sampling)."""
        if self.totals.count:
            logger.info(
                "stage %d: %d steady pipelined steps in %.1f s; mean step: %s",
                self.stage,
                self.totals.count,
                time.perf_counter() - self._started,
                self.totals.describe_mean(),
            )
        logger.info("stage %d device: %s", self.stage, self.timeline.describe())
        gc_passes = GC_TOTALS.since(self._gc_before)  # host pauses the device may idle through
        logger.info("stage %d host: garbage collection %s", self.stage, gc_passes.describe())
        trace_dir = envs.stage_trace_dir()
        if trace_dir is not None:
            trace_dir.mkdir(parents=True, exist_ok=True)
            path = trace_dir / f"stage{self.stage}-{os.getpid()}-{time.time_ns()}.json"
            path.write_text(json.dumps(self.timeline.rows()))
            logger.info("stage %d: micro-batch trace written to %s", self.stage, path)

    @property
    def ranks(self) -> tuple[int, ...]:
        return self.layout.ranks

    @property
    def me(self) -> int:
        return self.layout.ranks[self.stage]

    def exchange(self, plan: StepPlan) -> PhaseClock:
        """Runs the plan's KV moves: L-layer slices out of this worker's legacy view into
        this stage's view (the live KV exchange), then a restore's gathers the other way
        (workers/remote_attention.py), each in chunks (:func:`~workers.kv_exchange.move`:
        no copy of a step writes bytes another reads). Then the step's weight copies of a
        live restore (workers/weight_exchange.py). Returns the moves' host time by part
        (``kv_exchange.move``'s phases), for the first steps' logs."""
        parts = PhaseClock()
        if plan.moves or plan.gathers:
            stage_view, legacy_view = self.runner.kv_cache, self._legacy_view()
            me, transport = self.me, self.transport
            moved = kv_exchange.move(
                plan.moves, me, legacy_view, stage_view, transport, clock=parts
            )
            moved += kv_exchange.move(
                plan.gathers, me, stage_view, legacy_view, transport, clock=parts
            )
            self.counters["moved"] += moved
        if plan.weights:
            if self.refill is None:
                raise RuntimeError("a step plan refills weights but this stage cannot")
            self.counters["weight_bytes"] += self.refill(plan.weights)
        return parts

    def compute(
        self,
        x: StageInputs,
        router: RemoteAttention | None,
        input_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This stage's layers over a micro-batch that does not replay a decode graph: through
        the piecewise graphs when it has no pre-drop request and fits them (the returned
        tensors are then static buffers, overwritten by the next run), else eagerly.
        ``input_ids``: the first stage's tokens (``x`` then carries no activations)."""
        pieces = None if self.graphs is None or router is not None else self.graphs.piecewise
        if pieces is not None and pieces.size_for(x.positions.shape[0]) is not None:
            return pieces.run(x.meta, x.positions, input_ids, x.hidden, x.residual)
        r = self.runner
        if input_ids is None:
            return run_stage(r.model, r.kv_cache, x, router)
        return run_stage(
            r.model,
            r.kv_cache,
            None,
            router,
            input_ids=input_ids,
            positions=x.positions,
            meta=x.meta,
        )

    def router(self, plan: StepPlan | None) -> RemoteAttention | None:
        if plan is None or not plan.legacy:
            return None
        cfg, model = self.runner.model_config, self.runner.model
        return RemoteAttention(
            plan,
            self.me,
            self.layout,
            self._legacy_view(),
            self.transport,
            model.layers[0].self_attn.backend,
            model.cos_sin_cache,
            (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim),
            self.counters,
        )

    def serve(self, router: RemoteAttention | None, stages: range) -> None:
        """Serves the remote attention of ``stages`` for the sequences homed here."""
        if router is not None:
            for s in stages:
                router.serve(s, self.runner.dtype)

    def _legacy_view(self) -> torch.Tensor:
        if self.legacy_view is None:
            raise RuntimeError("a step plan has pre-drop KV but this stage has no legacy view")
        return self.legacy_view


@dataclasses.dataclass
class _Launched:
    """A launched, not yet collected pipeline step."""

    out: SchedulerOutput
    requests: list  # the sampling requests, in logits-row order
    sends: list  # deferred sends (attention.transport.wait_sends)
    plan: StepPlan | None
    launched: float  # time.perf_counter() at launch
    clock: PhaseClock  # its phases, launch and collect
    exchange: PhaseClock | None = None  # its KV moves' host time by part, if it moved any


class PipelineRunner(_Stage):
    """The leader's model runner in pipeline mode: the engine calls :meth:`execute` as it calls
    ``ModelRunner.execute``; every other attribute is the wrapped runner's (sampler, model,
    kv_cache, block_bytes).

    Each step the leader sends every other stage the step header (and, with pre-drop requests
    or KV moves, the :class:`StepPlan`), runs the moves, runs stage 0's layers, sends the
    activations to stage 1, serves the later stages' remote attention for the requests homed
    here, and samples from the logits the last stage returns. ``kv`` is the group's
    :class:`GroupKVManager` (None: no pre-drop requests to track).

    :meth:`launch` and :meth:`collect` split a step so that the engine keeps
    ``micro_batches`` (default: the stage count) in flight once no pre-drop request is left
    (:meth:`overlap_depth`); :meth:`execute` is both at once.
    """

    def __init__(
        self,
        runner: Any,
        transport: StageTransport,
        ranks: tuple[int, ...],
        layout: GroupLayout | None = None,
        kv: GroupKVManager | None = None,
        legacy_view: torch.Tensor | None = None,
        micro_batches: int | None = None,
        refill: Refill | None = None,
    ) -> None:
        layout = layout or GroupLayout(ranks, ())
        super().__init__(runner, transport, layout, 0, legacy_view, refill)
        self.kv = kv
        self.prefetch: WeightPrefetch | None = None
        """A live restore's weight copies still to run while the group serves (set by the
        restore's begin, workers/transition.py)."""
        self.micro_batches = micro_batches or len(ranks)
        self._launched: collections.deque[_Launched] = collections.deque()
        self.peak_in_flight = 0
        """The most steps launched and not yet collected at once so far."""
        self.steps = 0
        """Pipelined steps collected so far."""
        self._launches = 0
        self._collected: float | None = None
        """When the last collect returned, if nothing launched since (``time.perf_counter``)."""

    def __getattr__(self, name: str) -> Any:
        if name == "runner":  # not set yet: no recursion
            raise AttributeError(name)
        return getattr(self.runner, name)

    def _announce(self, header: StepHeader, plan: StepPlan | None) -> StepHeader:
        """Sends every other stage the header and the plan (if any); returns the header."""
        payload = None if plan is None else plan.encode(self.transport.device)
        if payload is not None:
            header = dataclasses.replace(header, plan_bytes=payload.numel())
        for rank in self.ranks[1:]:
            self.transport.send_header(rank, header)
            if payload is not None:
                self.transport.send(rank, payload)
        return header

    def abandon_launched(self) -> None:
        """Forgets the launched steps (an engine fault ended their requests)."""
        for step in self._launched:
            step.sends.clear()
        self._launched.clear()

    def _check_drained(self) -> None:
        if self._launched:
            raise RuntimeError(f"{len(self._launched)} pipeline steps are still in flight")

    @property
    def holds_prompts(self) -> bool:
        """Whether the next step must start no waiting request: the group's first step after
        a drop, while pre-drop KV is still to move. That step carries the live exchange, and
        a prompt's prefill beside it would add to every pre-drop request's token gap at the
        drop (2x H200, conversation burst: a 1,024-token chunk made the first step 32 ms).
        Later steps admit prompts as usual."""
        return self._launches == 0 and self.kv is not None and bool(self.kv.legacy)

    def overlap_depth(self) -> int:
        """Micro-batches the engine may keep in flight now: 1 while pre-drop requests remain
        or a restore gathers KV (their steps serve remote attention and move KV in lockstep),
        else ``micro_batches``."""
        if self.kv is not None and (self.kv.legacy or self.kv.gather_homes is not None):
            return 1
        return self.micro_batches

    def execute(
        self, out: SchedulerOutput
    ) -> tuple[dict[str, int], dict[str, TokenLogprobs | None]]:
        """Stage 0's layers here, the rest on the other stages; samples from the returned
        logits [num_sampling, vocab]. Returns token ids and logprobs by request id."""
        self.launch(out)
        return self.collect(out)

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput, feed: SampledTokens | None = None) -> None:
        """Sends the step's header (and plan) to every stage, runs its KV moves and stage 0,
        posts its activations to stage 1 and serves the later stages' remote attention; the
        logits are :meth:`collect`'s. Launches must be collected in order. ``feed``: the
        tokens of the step collected last (:meth:`collect_async`), for the requests that
        await one (:func:`feed_tokens`)."""
        r = self.runner
        self.profiler.step(self._launches)
        clock = _step_clock(r.device, self._launches)
        t0 = time.perf_counter()
        if self._collected is not None:  # the engine's update and schedule in between
            clock.phases["since collect"] = t0 - self._collected
            self._collected = None
        plan = None
        if self.kv is not None and (self.kv.legacy or self.kv.gather_homes is not None):
            weights = self._weights_step()
            moves = self.kv.plan_exchange(out)
            plan = self.kv.step_plan(out, moves, self.kv.plan_gather(out), weights)
            if not self.kv.legacy and self.kv.gather_homes is None:
                logger.info(
                    "kv exchange: every pre-drop request moved after %d steps (%.3f s)",
                    self.steps + 1,
                    t0 - self._started,
                )
        clock.mark("plan")
        size = None
        replayable = plan is None or not plan.legacy  # no remote attention this step
        if replayable and self.graphs is not None and all(s.samples for s in out.scheduled):
            size = self.graphs.size_for([s.num_new_tokens for s in out.scheduled])
        if size is None:
            inputs = r.prepare(out)
            requests = inputs.sampling_requests
            x = StageInputs(None, None, inputs.positions, inputs.meta, inputs.logits_indices)
            feed_tokens(inputs.input_ids, out.scheduled, feed)
        else:  # a decode micro-batch replays: its metadata is already on the device
            self.graphs.load_scheduled(out.scheduled, size)
            requests = [s.request for s in out.scheduled]
            x = self.graphs.sent_inputs(size, len(requests))
            feed_tokens(self.graphs.inputs.fields(size).input_ids, out.scheduled, feed)
        clock.mark("inputs")
        parts = None
        with self.transport.deferred_sends() as sends:
            self._announce(x.header(), plan)
            clock.mark("announce")
            if plan is not None:
                parts = self.exchange(plan)
                clock.mark("exchange")
            router = self.router(plan)
            begin = self.timeline.begin()
            if size is None:
                hidden, residual = self.compute(x, router, inputs.input_ids)
            else:
                hidden, residual = self.graphs.run(size, len(requests))
            figures = {}
            if self.timeline.traces:  # trace rows only: no work on the launch path otherwise
                figures = {"tokens": out.num_tokens, "attention_pairs": _attention_pairs(out)}
            self.timeline.end(begin, _kind(x), **figures)
            if self.graphs is not None:  # static buffers: the posted sends read them after
                hidden, residual = hidden.clone(), residual.clone()  # the next run began
            clock.mark("stage 0" if size is None else "stage 0 (graph)")
            self.transport.send_body(self.ranks[1], x.with_hidden(hidden, residual))
            self.serve(router, range(1, len(self.ranks)))
            clock.mark("send and serve")
        self._launches += 1
        self._launched.append(_Launched(out, requests, sends, plan, t0, clock, parts))
        self.peak_in_flight = max(self.peak_in_flight, len(self._launched))

    def _weights_step(self) -> list[WeightCopy]:
        """This step's share of a live restore's weight copies: none until the KV tail is
        fenced (no pipeline block left there), then a budget per link."""
        p = self.prefetch
        if p is None or not p.pending or not self.kv.fence(p.first_tail_block):
            return []
        copies = p.take()
        if not p.pending:
            logger.info(
                "restore: weights refilled while serving, in %d steps (%.1f MiB received by "
                "each stage)",
                p.steps,
                sum(p.nbytes(c.region) for c in p.done) / max(1, len(self.ranks)) / 2**20,
            )
        return copies

    def collect(
        self, out: SchedulerOutput
    ) -> tuple[dict[str, int], dict[str, TokenLogprobs | None]]:
        """Samples the oldest launched step (``out``) from the logits the last stage returns.
        Returns token ids and logprobs by request id."""
        return self.collect_async(out).by_request()

    @torch.inference_mode()
    def collect_async(self, out: SchedulerOutput) -> SampledTokens:
        """:meth:`collect` without reading the tokens back: posts the receive of the oldest
        launched step's logits and queues its sampling behind it; the tokens stay on the
        device for the next :meth:`launch` to feed (``feed``) until the engine reads them."""
        step = self._launched.popleft()
        if step.out is not out:
            raise RuntimeError("pipeline steps must be collected in the order they launched")
        r, requests, clock = self.runner, step.requests, step.clock
        clock.mark("in flight")  # other launches and collects since this one launched
        if requests:
            vocab = r.model_config.vocab_size
            logits = self.transport.recv_logits(self.ranks[-1], len(requests), vocab)
            self.timeline.mark("logits")
            clock.mark("later stages")
            sampled = r.sampler.sample_async(logits, requests)
            self.timeline.mark("sample")
        else:
            sampled = SampledTokens(torch.empty(0, dtype=torch.int64, device=r.device), [])
        wait_sends(step.sends)
        clock.mark("sample")
        self.steps += 1
        if self.steps > _LOGGED_STEPS and step.plan is None:
            self.totals.add(clock)
        if self.steps <= _LOGGED_STEPS:  # the first steps after a drop carry its token gap
            logger.info(
                "pipeline step %d: %.2f ms, %d sequences, %d pre-drop, %d KV slices moved, "
                "%d in flight (%s)%s",
                self.steps,
                1e3 * (time.perf_counter() - step.launched),
                len(out.scheduled),
                0 if step.plan is None else len(step.plan.legacy),
                0 if step.plan is None else len(step.plan.moves),
                len(self._launched) + 1,
                clock,
                _parts(step.exchange),
            )
        self._collected = time.perf_counter()
        return sampled

    @torch.inference_mode()
    def finish_exchange(self) -> int:
        """Moves the remaining KV of every pre-drop request partly moved now, in one step with
        no compute (a restore takes each request's KV either whole from its home or from
        pipeline blocks). Returns the requests moved; raises RuntimeError, moving nothing,
        when the group pool cannot hold them."""
        self._check_drained()
        if self.kv is None:
            return 0
        n = sum(not self.kv.is_home(rid) for rid in self.kv.legacy)
        if n == 0:
            return 0
        plan = StepPlan(tuple(self.kv.plan_exchange(None, everything=True)))
        self._announce(StepHeader(StageOp.STEP), plan)
        self.exchange(plan)
        return n

    def stop(self) -> None:
        """Sends STOP to every other stage (each stage loop returns)."""
        self._check_drained()
        self.profiler.finish()
        self.log_totals()
        for rank in self.ranks[1:]:
            self.transport.send_stop(rank)


class StageLoop(_Stage):
    """A non-leader stage's engine loop: serves steps until the leader sends STOP. ``stage``
    indexes ``ranks``; rank ``ranks[0]`` leads (headers, plans, logits)."""

    def __init__(
        self,
        runner: Any,
        transport: StageTransport,
        ranks: tuple[int, ...],
        stage: int,
        layout: GroupLayout | None = None,
        legacy_view: torch.Tensor | None = None,
        refill: Refill | None = None,
    ) -> None:
        if not 0 < stage < len(ranks):
            raise ValueError(f"stage {stage} of {len(ranks)} cannot run a stage loop")
        layout = layout or GroupLayout(ranks, ())
        super().__init__(runner, transport, layout, stage, legacy_view, refill)

    @property
    def is_last(self) -> bool:
        return self.stage == len(self.ranks) - 1

    @torch.inference_mode()
    def run(self) -> None:
        """Blocks on the leader; returns after STOP."""
        leader, prev = self.ranks[0], self.ranks[self.stage - 1]
        steps, done = 0, time.perf_counter()
        while (h := self.transport.recv_header(leader)).op is not StageOp.STOP:
            self.profiler.step(steps)
            clock = _step_clock(self.runner.device, steps)
            start = time.perf_counter()
            clock.phases["header wait"] = start - done
            plan = parts = None
            if h.plan_bytes:
                raw = self.transport.recv(leader, (h.plan_bytes,), torch.uint8)
                plan = StepPlan.decode(raw)
                clock.mark("plan")
                parts = self.exchange(plan)
                clock.mark("exchange")
            if h.num_seqs == 0:
                done = time.perf_counter()
                continue
            router = self.router(plan)
            self.serve(router, range(self.stage))
            clock.mark("serve")
            x = self.transport.recv_body(prev, h)
            self.timeline.mark("body")
            self.step(x, router)
            clock.mark("step")
            self.serve(router, range(self.stage + 1, len(self.ranks)))
            clock.mark("serve")
            steps, done = steps + 1, time.perf_counter()
            if steps > _LOGGED_STEPS and plan is None:
                self.totals.add(clock)
            if steps <= _LOGGED_STEPS:
                logger.info(
                    "stage %d, pipeline step %d: %.2f ms from its header, %d tokens, %s "
                    "pre-drop (%s)%s",
                    self.stage,
                    steps,
                    1e3 * (time.perf_counter() - start),
                    h.num_tokens,
                    0 if plan is None else len(plan.legacy),
                    clock,
                    _parts(parts),
                )
            elif time.perf_counter() - start > SLOW_STEP_S:  # host time: the wait is the header
                logger.warning(
                    "stage %d: a step of %d tokens took %.0f ms of host time (%s)",
                    self.stage,
                    h.num_tokens,
                    1e3 * (time.perf_counter() - start),
                    clock.describe(),
                )
        self.profiler.finish()
        self.log_totals()
        logger.debug("stage %d: pipeline stopped", self.stage)

    def step(self, x: StageInputs, router: RemoteAttention | None = None) -> None:
        begin = self.timeline.begin()
        out = self._layers(x, router)
        self.timeline.end(begin, _kind(x), tokens=x.hidden.shape[0])
        if not self.is_last:
            hidden, residual = out
            self.transport.send_body(self.ranks[self.stage + 1], x.with_hidden(hidden, residual))
        elif out is not None:
            self.transport.send_logits(self.ranks[0], out)

    def _layers(self, x: StageInputs, router: RemoteAttention | None) -> Any:
        """This stage's layers over ``x``: (hidden, residual), or on the last stage the
        sampling rows' logits [num_sampling, vocab] (None: no row samples)."""
        n, seqs = x.hidden.shape[0], x.meta.seq_lens.shape[0]
        size = None
        if router is None and self.graphs is not None and x.meta.max_query_len == 1:
            size = self.graphs.size_for([1] * seqs) if n == seqs else None
        if size is not None:  # a decode micro-batch: replay (sends finish before reuse)
            self.graphs.load_received(x, size)
            outs = self.graphs.run(size, n)
            if not self.is_last:
                return outs
            return outs[0].index_select(0, x.logits_indices) if x.logits_indices.numel() else None
        hidden, residual = self.compute(x, router)
        if not self.is_last:
            return hidden, residual
        if not x.logits_indices.numel():
            return None
        return self.runner.model.compute_logits(hidden[x.logits_indices])


def feed_tokens(
    input_ids: torch.Tensor, scheduled: Sequence[ScheduledRequest], feed: SampledTokens | None
) -> int:
    """Writes into ``input_ids`` (a step's token ids on the device, ``scheduled``'s tokens in
    order) the token of each request awaiting one (``Request.awaits_token``: its one new
    token is a placeholder), taken on the device from ``feed``, the step sampled before.
    Returns how many it wrote. Raises RuntimeError naming a request whose token ``feed``
    does not hold."""
    dst, src, offset = [], [], 0
    rows = None
    for s in scheduled:
        offset += s.num_new_tokens
        if not s.request.awaits_token:
            continue
        rows = rows if rows is not None else ({} if feed is None else feed.rows())
        row = rows.get(s.request.request_id)
        if row is None:
            raise RuntimeError(f"request {s.request.request_id} awaits a token no step sampled")
        dst.append(offset - 1)
        src.append(row)
    if dst:
        device = input_ids.device
        picked = feed.tokens.index_select(0, host_tensor(src, torch.int64, device))
        input_ids.index_copy_(0, host_tensor(dst, torch.int64, device), picked)
    return len(dst)


def _attention_pairs(out: SchedulerOutput) -> int:
    """Query-key pairs a step's causal attention computes, per layer and head (a
    micro-batch's trace figure: its compute grows with it)."""
    return sum(causal_pairs(s.num_new_tokens, s.start) for s in out.scheduled)


def _kind(x: StageInputs) -> str:
    """A micro-batch's kind in a stage's :class:`~workers.stalls.ComputeTimeline`."""
    return "decode" if x.meta.max_query_len == 1 else "prompt"


# --- restore: weights back from the stages that kept them ---------------------------------


def _parts(exchange: PhaseClock | None) -> str:
    """A step log's suffix: its KV moves' host time by part, if it moved any."""
    return f"; exchange host time: {exchange}" if exchange and exchange.phases else ""


def _units(num_layers: int) -> list[tuple[str, int]]:
    """Every module of a full model, in one order all stages walk: embedding, layers, norm,
    LM head."""
    return [("embed", -1), *(("layer", j) for j in range(num_layers)), ("norm", -1), ("head", -1)]


def _owner(unit: tuple[str, int], ranges: Sequence[tuple[int, int]]) -> int:
    """The stage that holds ``unit`` in pipeline mode."""
    kind, j = unit
    if kind == "embed":
        return 0
    if kind == "layer":
        return next(r for r, (start, end) in enumerate(ranges) if start <= j < end)
    return len(ranges) - 1


def _get(model: LlamaModel, unit: tuple[str, int]) -> nn.Module:
    kind, j = unit
    if kind == "layer":
        return model.layers[j - model.start]
    return {"embed": model.embed_tokens, "norm": model.norm, "head": model.lm_head}[kind]


def _put(model: LlamaModel, unit: tuple[str, int], module: nn.Module) -> None:
    kind, j = unit
    if kind == "layer":
        adopt_layer(model, j, module)
    else:
        setattr(model, {"embed": "embed_tokens", "norm": "norm", "head": "lm_head"}[kind], module)


def restore_full_model(
    model: LlamaModel,
    ranks: Sequence[int],
    ranges: Sequence[tuple[int, int]],
    stage: int,
    transport: StageTransport,
) -> LlamaModel:
    """Every stage at once: rebuilds the full model on each stage from its own modules plus
    every other stage's, copied over point to point (KunServe §3(d): the dropped layers come
    back from the peer that kept them). Each module is sent by its owner to every other stage,
    parameter by parameter, in one order all stages walk. Returns the full model."""
    device, dtype = model.cos_sin_cache.device, next(model.parameters()).dtype
    full = empty_model(model, (0, model.cfg.num_layers))
    for unit in _units(model.cfg.num_layers):
        owner = _owner(unit, ranges)
        if owner == stage:
            module = _get(model, unit)
            for r, rank in enumerate(ranks):
                if r != stage:
                    for p in module.parameters():
                        transport.send(rank, p.data)
        else:
            module = _get(full, unit).to_empty(device=device).to(dtype).requires_grad_(False)
            for p in module.parameters():
                transport.recv_into(ranks[owner], p.data)
        _put(full, unit, module)
    check_materialized(full)
    return full.eval()
