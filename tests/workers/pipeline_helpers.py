"""Helpers for the pipeline tests: engine config, a loopback transport, and the bodies of the
two-process gloo tests (run with ``torch.multiprocessing.spawn``, so they live in a module)."""

from __future__ import annotations

import functools
import json
import queue
import threading
from collections import defaultdict
from pathlib import Path

import torch
import torch.distributed as dist

from attention.transport import StageInputs, StageTransport, connect_all_pairs
from planner.drop_plan import stage_layer_ranges
from tests.server_harness import free_port
from workers.config import CacheConfig, EngineConfig, SchedulerConfig
from workers.engine import Engine, RequestSpec
from workers.pipeline import build_stage_model, run_stage
from workers.request import SamplingParams
from workers.transition import (
    GroupController,
    GroupSpec,
    TransitionError,
    check_block_ownership,
)

CPU = torch.device("cpu")
BLOCK_SIZE = 4
RANGES = ((0, 3), (3, 5))
"""stories260K's 5 layers over 2 stages (planner.drop_plan.stage_layer_ranges(5, 2))."""
GREEDY = SamplingParams(temperature=0.0)
SEEDED = SamplingParams(temperature=0.8, seed=7)

PROMPTS = {
    "a0": ([1, 403, 407, 261, 378], GREEDY),
    "a1": ([1, 291, 376, 280, 294, 286, 399, 296, 418, 329, 429, 412, 425, 372, 13, 300], GREEDY),
    "a2": ([1, 306, 302, 300], SEEDED),
    "b0": ([1, 403, 407], GREEDY),
    "b1": ([1, 280, 294, 286, 399, 296, 418, 329, 429, 412, 425], GREEDY),
    "b2": ([1, 376, 280, 294], GREEDY),
    "c0": ([1, 296, 418, 329, 429], GREEDY),
    "c1": ([1, 412, 425, 372, 13, 300, 301, 306, 302], GREEDY),
    "late": ([1, 403, 407, 261, 378, 432, 383], GREEDY),
}
"""Requests of the drop/restore test: a* start on rank 0, b* on rank 1, c* on rank 2 (with 3
workers), ``late`` arrives on the leader while the group is pipelined."""
MAX_TOKENS = 20
PHASES = ("before", "pipelined", "after")
"""Phases of the drop/restore test, in time order: own engines, the group, homes again."""


def engine_config(
    model_dir: Path | str,
    blocks: int = 64,
    budget: int = 8,
    memory_backend: str = "auto",
    exchange_bytes: int = 0,
    max_seqs: int = 2,
    attention_backend: str = "torch",
    pipeline_budget: int | None = None,
    stage_graphs_at_start: int = 0,
    chunk_cost: str = "tokens",
) -> EngineConfig:
    """float32, torch backend, 4-token blocks; a small token budget so prefills are chunked
    and a request can be mid-prefill when a transition starts; at most ``max_seqs`` running
    requests. A pipeline leader keeps one micro-batch per stage in flight."""
    return EngineConfig(
        model_path=str(model_dir),
        dtype="float32",
        attention_backend=attention_backend,
        memory_backend=memory_backend,
        stage_graphs_at_start=stage_graphs_at_start,
        # the least the KV exchange moves: one layer of one pre-drop request per step, so
        # remote attention serves them for many steps and a restore finishes the exchange
        cache=CacheConfig(
            block_size=BLOCK_SIZE, num_kv_blocks=blocks, kv_exchange_bytes_per_step=exchange_bytes
        ),
        scheduler=SchedulerConfig(
            max_num_batched_tokens=budget,
            max_num_seqs=max_seqs,
            max_model_len=96,
            pipeline_max_num_batched_tokens=pipeline_budget,
            pipeline_chunk_cost=chunk_cost,
        ),
    )


def requests_for(world: int) -> list[str]:
    """The drop/restore test's request ids with ``world`` workers."""
    return [rid for rid in PROMPTS if rid == "late" or "abc".index(rid[0]) < world]


def spec_of(rid: str) -> RequestSpec:
    ids, sampling = PROMPTS[rid]
    return RequestSpec(rid, ids, sampling, MAX_TOKENS)


def run_alone(
    model_dir: Path | str, rid: str, device: torch.device = CPU, backend: str = "torch"
) -> list[int]:
    """The tokens a fresh full engine generates for ``rid`` alone (the reference)."""
    engine = Engine(engine_config(model_dir, attention_backend=backend), device)
    engine.add_request(spec_of(rid))
    tokens: list[int] = []
    while engine.has_work:
        for out in engine.step():
            tokens += out.new_token_ids
    return tokens


class LoopbackTransport(StageTransport):
    """A StageTransport for stages in one process: each (src, dst) pair is a queue."""

    def __init__(self, rank: int, links: dict, hidden_size: int) -> None:
        super().__init__(CPU, hidden_size, torch.float32)
        self.rank = rank
        self.links = links

    def _link(self, src: int, dst: int) -> queue.Queue:
        return self.links.setdefault((src, dst), queue.Queue())

    def send(self, dst: int, t: torch.Tensor, group=None) -> None:
        if t.numel():
            self._link(self.rank, dst).put(t.detach().clone())

    def exchange(self, sends, recvs) -> None:
        self.post_exchange(sends, recvs)()

    def post_exchange(self, sends, recvs):
        """Sends now (queued in order per link); the returned function receives."""
        for dst, t in sends:
            self.send(dst, t)

        def wait() -> None:
            for src, t in recvs:
                self.recv_into(src, t)

        return wait

    def recv_into(self, src: int, out: torch.Tensor, group=None) -> None:
        if out.numel():
            out.copy_(self._link(src, self.rank).get(timeout=30))


def spawn_gloo(body: str, model_dir: Path | str, out: Path, world: int = 2) -> list[dict]:
    """Runs gloo body ``body`` on ``world`` processes; returns each rank's JSON result."""
    init = f"tcp://127.0.0.1:{free_port()}"
    args = (world, init, body, str(model_dir), str(out))
    torch.multiprocessing.spawn(gloo_main, args=args, nprocs=world, join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def tokens_by_request(results: list[dict]) -> dict[str, list[int]]:
    """Each request's tokens over the phases, in time order (one rank per request a phase)."""
    tokens: dict[str, list[int]] = {}
    for phase in PHASES:
        for rank in results:
            for rid, ids in rank["tokens"][phase].items():
                tokens.setdefault(rid, []).extend(ids)
    return tokens


# --- two-process gloo bodies (torch.multiprocessing.spawn calls fn(rank, *args)) ------------


def gloo_main(rank: int, world: int, init: str, body: str, model_dir: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, world_size=world, rank=rank)
    try:
        bodies = {
            "transport_step": _transport_step,
            "drop_restore": _drop_restore,
            "drop_switch_refused": _drop_switch_refused,
            "drop_restore_vmm": functools.partial(_drop_restore, memory_backend="vmm"),
            # one pipelined step, then a restore: the restore finishes the KV exchange
            "drop_then_restore_at_once": functools.partial(_drop_restore, pipelined=(1, 0)),
            # the KV exchange done in the first pipelined step, then one micro-batch per stage
            # in flight
            "drop_restore_overlapped": functools.partial(
                _drop_restore, exchange_bytes=1 << 30, max_seqs=4, pipelined=(12, 30)
            ),
            # a live restore: the group gathers every request's KV home while it decodes
            # (and on VMM refills the dropped weights)
            "drop_restore_gathered": functools.partial(
                _drop_restore, max_seqs=4, pipelined=(6, 2), gather=True
            ),
            "drop_restore_gathered_vmm": functools.partial(
                _drop_restore, max_seqs=4, pipelined=(6, 2), gather=True, memory_backend="vmm"
            ),
            # a restore refused after two live steps: the group serves on, then restores
            "drop_gather_cancelled_vmm": functools.partial(
                _drop_restore,
                max_seqs=4,
                pipelined=(6, 2),
                gather=True,
                cancel_after=2,
                memory_backend="vmm",
            ),
        }
        result = bodies[body](rank, world, model_dir)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@torch.inference_mode()
def _transport_step(rank: int, world: int, model_dir: str) -> dict:
    """Rank 0 runs stage 0 of one prefill step and sends it; rank 1 runs stage 1 and sends the
    logits back; rank 0 compares them with its full model's."""
    engine = Engine(engine_config(model_dir, budget=64), CPU)
    runner = engine.runner
    stage, _ = build_stage_model(runner.model, RANGES[rank])
    kv = torch.zeros(16, 3 if rank == 0 else 2, *runner.kv_cache.shape[2:])
    transport = StageTransport(CPU, runner.model_config.hidden_size, torch.float32)
    if rank == 1:
        x = transport.recv_step(0)
        hidden, _ = run_stage(stage, kv, x)
        transport.send_logits(0, stage.compute_logits(hidden[x.logits_indices]))
        return {}
    full = Engine(engine_config(model_dir, budget=64), CPU).runner
    for rid in ("a0", "a1"):
        engine.add_request(spec_of(rid))
    out = engine.scheduler.schedule()
    inputs = full.prepare(out)
    ref, _ = run_stage(full.model, full.kv_cache, None, **_first(inputs))
    ref_logits = full.model.compute_logits(ref[inputs.logits_indices])
    hidden, residual = run_stage(stage, kv, None, **_first(inputs))
    x = StageInputs(hidden, residual, inputs.positions, inputs.meta, inputs.logits_indices)
    transport.send_step(1, x)
    logits = transport.recv_logits(1, len(inputs.sampling_requests), ref_logits.shape[1])
    return {"equal": bool(torch.equal(logits, ref_logits)), "rows": logits.shape[0]}


def _first(inputs) -> dict:
    return {"input_ids": inputs.input_ids, "positions": inputs.positions, "meta": inputs.meta}


class StubWorker:
    """What GroupController needs of a Worker."""

    def __init__(self, rank: int, engine: Engine, return_group=None) -> None:
        self.rank = rank
        self.engine = engine
        self.return_group = return_group
        self.last_seq = 0  # no pushes: the test collects the tokens itself

    def drain_inbox(self) -> None:
        pass

    def iteration(self) -> int:
        return 0

    def wait_iteration(self, mark: int, timeout_s: float) -> bool:
        return True  # the test's own thread runs the steps: none is in flight


def _drop_switch_refused(rank: int, world: int, model_dir: str) -> dict:
    """A drop whose last member refuses at its prepare (it is in a group already): every
    member raises TransitionError from ``drop_switch`` and still serves, unchanged."""
    engine = Engine(engine_config(model_dir), CPU)
    for rid in requests_for(world):
        if rid.startswith("abc"[rank]):
            engine.add_request(spec_of(rid))
    tokens: dict[str, list[int]] = defaultdict(list)
    _steps(engine, tokens, 2)
    ctl = GroupController(StubWorker(rank, engine))
    spec = GroupSpec(0, tuple(range(world)), tuple(stage_layer_ranges(5, world)))
    if rank == world - 1:
        ctl.spec = GroupSpec(7, tuple(range(world)), spec.ranges)
    try:
        ctl.drop_switch(spec)
        raised = None
    except TransitionError as e:
        raised = str(e)
    ctl.spec = None
    running = len(engine.scheduler.running)
    _steps(engine, tokens, 2)
    return {"raised": raised, "describe": ctl.describe(), "running": running, "tokens": tokens}


def _drop_restore(
    rank: int,
    world: int,
    model_dir: str,
    memory_backend: str = "auto",
    pipelined: tuple[int, int] = (4, 4),
    exchange_bytes: int = 0,
    max_seqs: int = 2,
    device: torch.device = CPU,
    backend: str = "torch",
    return_group=None,
    gather: bool = False,
    cancel_after: int | None = None,
    stage_graphs_at_start: int = 0,
) -> dict:
    """Every rank serves its requests, they drop into a ``world``-stage group, the leader steps
    the group (a request arrives meanwhile), they restore and finish. Returns tokens by phase
    and request, and the capacities seen. On VMM memory its integrity is checked after each
    transition. ``gather``: the restore begins live, and the leader steps until every running
    request's KV is home (at most 60 steps) before it parks; ``cancel_after``: the restore is
    refused after that many gather steps (``restore_cancel``) and the group runs 6 more steps
    as a pipeline before the restore."""
    config = engine_config(
        model_dir,
        memory_backend=memory_backend,
        exchange_bytes=exchange_bytes,
        max_seqs=max_seqs,
        attention_backend=backend,
        stage_graphs_at_start=stage_graphs_at_start,
    )
    engine = Engine(config, device)
    memory = engine.runner.memory
    ctl = GroupController(StubWorker(rank, engine, return_group))
    tokens: dict[str, dict[str, list[int]]] = {p: defaultdict(list) for p in PHASES}
    for rid in requests_for(world):
        if rid.startswith("abc"[rank]):
            engine.add_request(spec_of(rid))
    _steps(engine, tokens["before"], 2)
    sched = engine.scheduler
    at_drop = {
        "mid_prefill": [r.request_id for r in sched.running if r.num_pending_tokens > 1],
        "waiting": [r.request_id for r in sched.waiting],
    }
    spec = GroupSpec(0, tuple(range(world)), tuple(stage_layer_ranges(5, world)))
    ctl.drop_stage(spec)  # as the coordinator does, while the engines still serve
    reports = _all_gather(ctl.drop_prepare(spec))  # each member's report, for the checks
    outcome = ctl.drop_switch(spec)  # the members trade their reports themselves
    stage_blocks = outcome.stage_blocks
    if rank == 0:
        assert outcome.group_blocks == min(r.stage_blocks for r in reports)
        assert outcome.normal_blocks == sum(r.normal_blocks for r in reports)
        exported = [t.request.request_id for r in reports[1:] for t in r.transfers]
        assert outcome.exported == exported
        assert ctl.worker.push_after == {r.rank: 0 for r in reports[1:]}
    if memory is not None:
        memory.check_integrity()
        # the lent tail holds no KV yet: wipe the dropped weights' stale bytes there, so only a
        # copy from the stage that kept them can bring them back (zeros are harmless as KV)
        memory.kv.prefix_bytes()[ctl.memory.normal_bytes :].zero_()
    info = {"reports": [(r.stage_blocks, r.freed_bytes, r.normal_blocks) for r in reports]}
    info["at_drop"] = at_drop
    info["pipelined"] = ctl.describe()
    stage = engine.runner if rank == 0 else ctl.stage_loop
    info["stage_graphs_at_drop"] = 0 if stage.graphs is None else len(stage.graphs.graphs)
    plan = None
    if rank == 0:
        held = [engine.runner.holds_prompts]  # pre-drop KV to move: its first step holds them
        _steps(engine, tokens["pipelined"], 1)
        info["held_prompts"] = [*held, engine.runner.holds_prompts]
        _steps(engine, tokens["pipelined"], pipelined[0] - 1)
        engine.add_request(spec_of("late"))
        _steps(engine, tokens["pipelined"], pipelined[1])
        if gather:
            ctl.restore_begin()
            info["to_gather_at_begin"] = engine.stats().num_to_gather
            steps = 0
            limit = 60 if cancel_after is None else cancel_after
            while not engine.restore_ready() and steps < limit:
                _steps(engine, tokens["pipelined"], 1)
                check_block_ownership(engine)
                steps += 1
            info["gather_steps"] = steps
            info["to_gather"] = engine.stats().num_to_gather
            info["weights_to_refill"] = engine.stats().weight_bytes_to_refill
            info["held_waiting"] = [r.request_id for r in engine.scheduler.waiting]
            prefetch = engine.runner.prefetch
            info["weights_refilled_live"] = 0 if prefetch is None else len(prefetch.done)
            if cancel_after is not None:
                info["home_at_cancel"] = sorted(
                    r.request_id
                    for r in engine.scheduler.running
                    if engine.kv.is_home(r.request_id)
                )
                ctl.restore_cancel()
                _steps(engine, tokens["pipelined"], 6)
                check_block_ownership(engine)
        info["max_in_flight"] = engine.runner.peak_in_flight
        graphs = engine.runner.graphs
        info["graph_replays"] = 0 if graphs is None else graphs.num_replays
        for out in engine.drain():  # as the worker does before a transition parks it
            tokens["pipelined"][out.request_id] += out.new_token_ids
        info["legacy_at_restore"] = sorted(engine.kv.legacy)
        plan = ctl.restore_plan()  # as the coordinator does: the stage loops still run
        info["counters"] = dict(engine.runner.counters)
        ctl.stop_pipeline()
    else:
        stage = ctl.stage_loop
        loop = threading.Thread(target=_on_device, args=(device, ctl.run_stage_loop))
        loop.start()
        loop.join(timeout=120)
        info["counters"] = dict(stage.counters)
        info["graph_replays"] = 0 if stage.graphs is None else stage.graphs.num_replays
    plan = _broadcast(plan)
    info["restore_copies"] = len(plan.copies)
    info["weights_refilled"] = len(plan.weights_done)
    restored_blocks = ctl.restore_execute(plan)
    check_block_ownership(engine)
    if memory is not None:
        memory.check_integrity()
    info["homes"] = plan.homes
    _steps(engine, tokens["after"], 10_000)
    check_block_ownership(engine)
    info.update(stage_blocks=stage_blocks, restored_blocks=restored_blocks, tokens=tokens)
    info["restored"] = ctl.describe()
    return info


def nccl_main(
    rank: int, world: int, init: str, model_dir: str, out_dir: str, gather: bool = False
) -> None:
    """The overlapped drop/restore body on GPU ``rank`` over NCCL, Triton backend (decode
    micro-batches replay stage graphs), logits on their own process group as Worker sets up;
    ``gather``: the restore gathers KV live first."""
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=init, world_size=world, rank=rank)
    try:
        device = torch.device("cuda", rank)
        connect_all_pairs(rank, world, device)  # as Worker.init_distributed does
        group = dist.new_group(list(range(world)))
        connect_all_pairs(rank, world, device, group)
        result = _drop_restore(
            rank,
            world,
            model_dir,
            exchange_bytes=1 << 30,
            max_seqs=4,
            pipelined=(12, 30),
            device=device,
            backend="triton",
            return_group=group,
            gather=gather,
            stage_graphs_at_start=2 if gather else 0,  # both ways: captured at start, on use
        )
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _on_device(device: torch.device, fn) -> None:
    """Runs ``fn`` in this thread with ``device`` current (a new thread starts on cuda:0,
    as the Worker's engine thread sets its device first)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
    fn()


def _steps(engine: Engine, tokens: dict[str, list[int]], n: int) -> None:
    for _ in range(n):
        if not engine.has_work:
            return
        for out in engine.step():
            tokens[out.request_id] += out.new_token_ids


def _all_gather(obj: object) -> list:
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _broadcast(obj: object) -> object:
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
