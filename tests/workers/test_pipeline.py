"""Pipeline stages, drop capacity arithmetic, and drop/restore over gloo (stories260K, CPU)."""

from __future__ import annotations

import functools
import json
import logging
import re
import threading
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from attention.transport import StageInputs, StageOp, StepHeader
from planner.drop_plan import stage_layer_ranges
from tests.server_harness import free_port
from tests.workers.pipeline_helpers import (
    CPU,
    GREEDY,
    PHASES,
    PROMPTS,
    RANGES,
    LoopbackTransport,
    StubWorker,
    engine_config,
    nccl_main,
    requests_for,
    run_alone,
    spawn_gloo,
    spec_of,
    tokens_by_request,
)
from workers.engine import Engine, RequestSpec
from workers.kv_buffer import KVBuffer
from workers.pipeline import (
    PipelineRunner,
    StageLoop,
    _attention_pairs,
    build_stage_model,
    point_layers_at_kv_slots,
    run_stage,
    stage_graphs_for,
)
from workers.request import Request
from workers.scheduler import ScheduledRequest, SchedulerOutput
from workers.stage_memory import VmmStageMemory
from workers.transition import GroupSpec

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LAYER_BYTES = 45440 * 4
"""One stories260K layer: 64·(64+2·32) + 64·64 + 3·64·172 + 2·64 float32 parameters."""
EMBED_BYTES = 512 * 64 * 4
"""The embedding (and the tied LM head's own copy of it): vocab 512 × hidden 64, float32."""
FULL_BLOCK_BYTES = 5 * 2 * 4 * 4 * 8 * 4
"""5 layers × K,V × 4 tokens × 4 KV heads × 8 dims × 4 bytes."""


def test_stage_ranges_split_five_layers() -> None:
    assert stage_layer_ranges(5, 2) == list(RANGES)


def test_attention_pairs_count_each_chunks_causal_query_key_pairs() -> None:
    """A 3-token chunk from position 4 pairs its tokens with 5, 6 and 7 positions (18);
    a decode at position 9 with 10; a prompt's first 2 tokens with 1 and 2."""
    chunk, decode, first = (Request(r, list(range(12)), GREEDY, 4, frozenset()) for r in "abc")
    chunk.num_computed_tokens, decode.num_computed_tokens = 4, 9
    out = SchedulerOutput([ScheduledRequest(chunk, 3), ScheduledRequest(decode, 1),
                           ScheduledRequest(first, 2)])  # fmt: skip
    assert _attention_pairs(out) == 18 + 10 + 3


def test_step_header_round_trip() -> None:
    for h in (
        StepHeader(StageOp.STEP, 7, 2, 3, 2, 5, 9),
        StepHeader(StageOp.STEP, 7, 3, 3, 2, 5, 9, 40, 2),
    ):
        assert StepHeader.decode(h.encode(CPU)) == h


@torch.inference_mode()
def test_stage_models_chained_equal_full_model(stories_dir: Path) -> None:
    """Prefill then decode: stage 0 then stage 1 give the full model's logits exactly, and
    each stage's KV cache holds the full cache's slice of its layers."""
    full = Engine(engine_config(stories_dir, budget=64), CPU)
    split = Engine(engine_config(stories_dir, budget=64), CPU).runner
    stage0, _ = build_stage_model(split.model, RANGES[0])
    stage1, _ = build_stage_model(Engine(engine_config(stories_dir), CPU).runner.model, RANGES[1])
    kv0 = torch.zeros(64, 3, *full.runner.kv_cache.shape[2:])
    kv1 = torch.zeros(64, 2, *full.runner.kv_cache.shape[2:])
    for rid in ("a0", "a1", "b1"):
        full.add_request(spec_of(rid))
    for _ in range(2):  # prefill, then one decode
        out = full.scheduler.schedule()
        inputs = full.runner.prepare(out)
        first = {"input_ids": inputs.input_ids, "positions": inputs.positions, "meta": inputs.meta}
        ref, _ = run_stage(full.runner.model, full.runner.kv_cache, None, **first)
        ref_logits = full.runner.model.compute_logits(ref[inputs.logits_indices])
        h, r = run_stage(stage0, kv0, None, **first)
        x = StageInputs(h, r, inputs.positions, inputs.meta, inputs.logits_indices)
        h1, _ = run_stage(stage1, kv1, x)
        assert torch.equal(stage1.compute_logits(h1[x.logits_indices]), ref_logits)
        tokens = ref_logits.argmax(-1).tolist()
        ids = [q.request_id for q in inputs.sampling_requests]
        full.scheduler.update(out, dict(zip(ids, tokens, strict=True)))
    used = sorted(b for q in full.scheduler.running for b in q.block_ids)
    assert torch.equal(kv0[used], full.runner.kv_cache[used, 0:3])
    assert torch.equal(kv1[used], full.runner.kv_cache[used, 3:5])


def test_build_stage_model_moves_modules_and_counts_freed_bytes(stories_dir: Path) -> None:
    model = Engine(engine_config(stories_dir), CPU).runner.model
    layers = list(model.layers)
    stage, freed = build_stage_model(model, (3, 5))
    assert (stage.start, stage.end, stage.embed_tokens) == (3, 5, None)
    assert stage.layers[0] is layers[3] and stage.layers[1] is layers[4]  # moved, not copied
    assert [m.self_attn.local_layer for m in stage.layers] == [0, 1]
    assert stage.lm_head is model.lm_head
    assert freed == 3 * LAYER_BYTES + EMBED_BYTES
    _, freed0 = build_stage_model(Engine(engine_config(stories_dir), CPU).runner.model, (0, 3))
    assert freed0 == 2 * LAYER_BYTES + EMBED_BYTES + 64 * 4  # layers 3-4, LM head, final norm


@pytest.mark.parametrize(("rank", "blocks"), [(0, 267), (1, 490)])
def test_drop_capacity_is_old_plus_freed_bytes_in_stage_blocks(
    stories_dir: Path, rank: int, blocks: int
) -> None:
    """M_r = floor((N·full block bytes + freed bytes) / stage block bytes), N = 64 blocks."""
    from workers.transition import GroupController

    engine = Engine(engine_config(stories_dir, blocks=64), CPU)
    report = GroupController(StubWorker(rank, engine)).drop_prepare(GroupSpec(0, (0, 1), RANGES))
    start, end = RANGES[rank]
    freed = 2 * LAYER_BYTES + EMBED_BYTES + 256 if rank == 0 else 3 * LAYER_BYTES + EMBED_BYTES
    stage_block = FULL_BLOCK_BYTES * (end - start) // 5
    assert (report.freed_bytes, report.normal_blocks) == (freed, 64)
    assert report.stage_blocks == (64 * FULL_BLOCK_BYTES + freed) // stage_block == blocks


def _busy_engine(model_dir: Path) -> Engine:
    """An engine with a0 and a1 running (prefilled, 2 and 4 blocks) and a2 waiting."""
    engine = Engine(engine_config(model_dir, budget=64), CPU)
    for rid in ("a0", "a1", "a2"):
        engine.add_request(spec_of(rid))
    engine.step()
    return engine


def test_drop_merge_keeps_pre_drop_kv_in_place(stories_dir: Path) -> None:
    """A merge plans no KV copy and leaves the running requests' blocks alone: their KV stays
    home (remote attention) until the exchange moves it, after the drop."""
    from workers.transition import DropReport, GroupController

    engine = _busy_engine(stories_dir)
    before = (engine.scheduler, [list(r.block_ids) for r in engine.scheduler.running])
    ctl = GroupController(StubWorker(0, engine))
    reports = [DropReport(0, 5, 0, 64, 6), DropReport(1, 9, 0, 64, 0)]
    ctl.drop_merge(GroupSpec(0, (0, 1), RANGES), reports)
    assert before == (engine.scheduler, [list(r.block_ids) for r in engine.scheduler.running])
    assert ctl._merge.kv.pool.num_blocks == 5 and not ctl._merge.kv.legacy


def test_restore_that_does_not_fit_changes_nothing(stories_dir: Path) -> None:
    """Each member would get 3 blocks back: a1's 4 blocks fit on neither."""
    from workers.transition import GroupController, TransitionError

    engine = _busy_engine(stories_dir)
    ctl = GroupController(StubWorker(0, engine))
    ctl.spec, ctl.normal_blocks = GroupSpec(0, (0, 1), RANGES), {0: 3, 1: 3}
    with pytest.raises(TransitionError, match="a1 needs 4 blocks"):
        ctl.restore_plan()
    ctl.normal_blocks, ctl.origins = {0: 3, 1: 4}, {"a2": 1}
    plan = ctl.restore_plan()
    # back to its origin when it fits (a2), else the least-loaded member that fits
    assert plan.homes == {"a0": 0, "a1": 1, "a2": 1}
    assert [t.request.request_id for t in plan.transfers[1]] == ["a1", "a2"]
    assert plan.new_blocks == {"a0": [0, 1], "a1": [0, 1, 2, 3]}
    assert [(c.src_rank, c.dst_rank, c.src_layers, c.dst_layers) for c in plan.copies] == [
        (0, 0, (0, 3), (0, 3)),
        (0, 1, (0, 3), (0, 3)),
        (1, 0, (0, 2), (3, 5)),
        (1, 1, (0, 2), (3, 5)),
    ]


def test_kv_buffer_grows_and_shrinks_keeping_the_prefix() -> None:
    cache = torch.arange(64 * 5 * 2 * 4 * 4 * 8, dtype=torch.float32).view(64, 5, 2, 4, 4, 8)
    buf = KVBuffer.adopt(cache)
    assert (buf.nbytes, buf.num_blocks(5), buf.num_blocks(3)) == (64 * FULL_BLOCK_BYTES, 64, 106)
    buf.resize(146 * buf.block_bytes(3))
    assert buf.view(3).shape == (146, 3, 2, 4, 4, 8)
    buf.resize(64 * FULL_BLOCK_BYTES)
    assert torch.equal(buf.view(5), cache)


def _run_loopback_pipeline(
    stories_dir: Path,
    rids: list[str],
    max_seqs: int = 2,
    pipeline_budget: int | None = None,
    launched: list[int] | None = None,
    chunk_cost: str = "tokens",
) -> tuple[Engine, StageLoop, dict[str, list[int]]]:
    """The leader's engine steps through a PipelineRunner while stage 1 runs a StageLoop in a
    thread, over a loopback transport, until ``rids`` finish; returns the leader, the stage
    loop and each request's tokens. ``launched`` collects the tokens of every launched step."""
    config = engine_config(
        stories_dir,
        budget=16,
        max_seqs=max_seqs,
        pipeline_budget=pipeline_budget,
        chunk_cost=chunk_cost,
    )
    leader = Engine(config, CPU)
    member = Engine(engine_config(stories_dir, budget=16, max_seqs=max_seqs), CPU)
    links: dict = {}
    ranks = (0, 1)
    for engine, layers in ((leader, RANGES[0]), (member, RANGES[1])):
        engine.runner.model, _ = build_stage_model(engine.runner.model, layers)
        engine.runner.kv_cache = torch.zeros(64, layers[1] - layers[0], 2, 4, 4, 8)
    hidden = leader.runner.model_config.hidden_size
    loop = StageLoop(member.runner, LoopbackTransport(1, links, hidden), ranks, 1)
    thread = threading.Thread(target=loop.run)
    thread.start()
    leader.runner = PipelineRunner(leader.runner, LoopbackTransport(0, links, hidden), ranks)
    if launched is not None:
        launch = leader.runner.launch

        def counted(out, feed=None):
            launched.append(out.num_tokens)
            launch(out, feed)

        leader.runner.launch = counted
    for rid in rids:
        leader.add_request(spec_of(rid))
    tokens: dict[str, list[int]] = {rid: [] for rid in rids}
    while leader.has_work:
        for out in leader.step():
            tokens[out.request_id] += out.new_token_ids
    leader.runner.transport.send_stop(1)
    thread.join(timeout=30)
    assert not thread.is_alive()
    return leader, loop, tokens


def test_pipeline_runner_and_stage_loop_generate_what_the_full_engine_does(
    stories_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The leader's engine steps through a PipelineRunner; stage 1 runs a StageLoop in a
    thread; they talk over a loopback transport. Greedy and seeded tokens equal each request's
    alone on a full engine. When it stops, stage 1 logs its device's and its host's pauses."""
    rids = ["a0", "a1", "a2", "b1"]
    with caplog.at_level(logging.INFO, logger="workers.pipeline"):
        _, _, tokens = _run_loopback_pipeline(stories_dir, rids)
    assert tokens == {rid: run_alone(stories_dir, rid) for rid in rids}
    assert "stage 1 device: " in caplog.text
    assert re.search(r"stage 1 host: garbage collection \d+ passes, [\d.]+ ms \(gen0", caplog.text)


def test_pipeline_token_budget_caps_every_micro_batch(stories_dir: Path) -> None:
    """pipeline_max_num_batched_tokens (5 here, against 16 unpipelined) caps every
    micro-batch the leader launches, prompts are chunked to fit, and every request still gets
    its tokens alone."""
    rids = ["a0", "a1", "a2", "b1"]
    launched: list[int] = []
    leader, _, tokens = _run_loopback_pipeline(stories_dir, rids, 4, 5, launched)
    assert tokens == {rid: run_alone(stories_dir, rid) for rid in rids}
    assert max(launched) == 5 and len(launched) > 20
    assert leader.config.scheduler.pipeline_token_budget == 5


def test_attention_chunk_cost_shrinks_deep_chunks_and_keeps_every_token(
    stories_dir: Path,
) -> None:
    """pipeline_chunk_cost="attention": a chunk's tokens count with their attention
    (stories260K breaks even at about 250 tokens of context), so prompt chunks deep in a
    prompt take fewer of the 5-token budget: more micro-batches than by tokens, none over the
    budget, and every request still gets its tokens alone."""
    rids = ["a0", "a1", "a2", "b1"]
    by_tokens: list[int] = []
    _run_loopback_pipeline(stories_dir, rids, 4, 5, by_tokens)
    by_cost: list[int] = []
    leader, _, tokens = _run_loopback_pipeline(stories_dir, rids, 4, 5, by_cost, "attention")
    assert tokens == {rid: run_alone(stories_dir, rid) for rid in rids}
    assert max(by_cost) <= 5 and len(by_cost) > len(by_tokens)
    assert 240 < leader.runner.model_config.attention_break_even < 260


def test_an_engine_whose_runner_holds_prompts_starts_no_waiting_request(
    stories_dir: Path,
) -> None:
    """A pipeline group's first step after a drop (``PipelineRunner.holds_prompts``) decodes
    the running requests and starts no prompt; the next step starts it."""

    class Holding:
        def __init__(self, runner) -> None:
            self.runner, self.holds_prompts = runner, True

        def __getattr__(self, name: str):
            return getattr(self.runner, name)

    engine = Engine(engine_config(stories_dir, budget=16, max_seqs=4), CPU)
    engine.add_request(spec_of("a0"))
    engine.step()
    engine.add_request(spec_of("b0"))
    engine.runner = Holding(engine.runner)
    assert [o.request_id for o in engine.step()] == ["a0"]
    assert [r.request_id for r in engine.scheduler.waiting] == ["b0"]
    engine.runner.holds_prompts = False
    assert sorted(o.request_id for o in engine.step()) == ["a0", "b0"]


def test_a_staged_drop_waits_out_the_prompt_step_in_flight_then_steps_decode_only(
    stories_dir: Path,
) -> None:
    """``drop_stage`` on a serving worker: it returns only once the step in flight (one with
    prompt tokens) has ended, and from then on the engine's steps decode only (the running
    request keeps its tokens coming, the prompt mid-prefill waits), until the hold ends."""
    import time

    from workers.worker import Worker

    class Coordinator:  # what the worker loop pushes to
        class push_outputs:  # noqa: N801 (a Ray actor method's shape)
            @staticmethod
            def remote(result) -> None:
                pass

    threads = torch.get_num_threads()
    worker = Worker(0, engine_config(stories_dir, budget=4), Coordinator(), use_gpu=False)
    torch.set_num_threads(threads)
    engine = worker.engine = Engine(worker.config, CPU)
    ended: list[float] = []  # when each step with prompt tokens ended
    running: list[bool] = []  # one entry per step with prompt tokens begun
    execute = engine.runner.execute

    def slow_prompts(out):  # prompt steps long enough for the stage to land inside one
        result = execute(out)
        if any(s.num_new_tokens > 1 for s in out.scheduled):
            running.append(True)
            time.sleep(0.05)
            ended.append(time.monotonic())
        return result

    engine.runner.execute = slow_prompts
    ids, sampling = PROMPTS["b0"]
    worker.add_requests([RequestSpec("a", ids, sampling, 80)])
    worker.start()
    try:
        a = _wait_for(lambda: engine.scheduler.running and engine.scheduler.running[0])
        _wait_for(lambda: a.num_output_tokens >= 2)
        ids, sampling = PROMPTS["b1"]  # 11 prompt tokens: 3 a step beside a's decode
        worker.add_requests([RequestSpec("b", ids, sampling, 8)])
        b = _wait_for(lambda: len(engine.scheduler.running) == 2 and engine.scheduler.running[1])
        _wait_for(lambda: len(running) > len(ended))  # a step of b's prompt is in flight
        before = len(ended)
        worker.group.drop_stage(GroupSpec(0, (0, 1), RANGES))
        assert len(ended) > before  # that step had ended
        computed, decoded = b.num_computed_tokens, a.num_output_tokens
        assert 0 < computed < b.num_prompt_tokens
        _wait_for(lambda: a.num_output_tokens >= decoded + 3)
        assert b.num_computed_tokens == computed  # held: only a's decodes ran
        engine.hold_prompts(0)  # the switch ends the hold
        _wait_for(lambda: b.num_output_tokens >= 1)
    finally:
        worker.shutdown()


def _wait_for(predicate, timeout_s: float = 10.0):
    """Polls ``predicate`` until it is truthy; returns its value."""
    import time

    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)
    return value


def test_scheduler_output_with_no_sampling_rows_sends_no_logits(stories_dir: Path) -> None:
    """A step whose only request is mid-prefill samples nothing: no logits come back."""
    leader = Engine(engine_config(stories_dir, budget=4), CPU)
    links: dict = {}
    leader.runner.model, _ = build_stage_model(leader.runner.model, RANGES[0])
    leader.runner.kv_cache = torch.zeros(64, 3, 2, 4, 4, 8)
    runner = PipelineRunner(leader.runner, LoopbackTransport(0, links, 64), (0, 1))
    leader.add_request(spec_of("a1"))
    out = leader.scheduler.schedule()
    assert [s.samples for s in out.scheduled] == [False]
    assert runner.execute(out) == ({}, {})
    # the header, hidden, residual and the packed metadata (with no logits indices in it)
    assert links[(0, 1)].qsize() == 4
    assert (1, 0) not in links  # and no logits come back


def test_gloo_transport_one_step_equals_local(stories_dir: Path, tmp_path: Path) -> None:
    rank0, _ = spawn_gloo("transport_step", stories_dir, tmp_path)
    assert rank0 == {"equal": True, "rows": 2}


RESTORED = {"group_id": None, "layer_range": [0, 5], "kv_blocks": 64, "pool_blocks": 64}
VMM_BLOCKS = {"kv_blocks": 409, "pool_blocks": 409}
"""On VMM memory the normal KV is one 2 MiB chunk (emulated): 409 blocks."""


def test_gloo_drop_then_restore_keeps_every_token(stories_dir: Path, tmp_path: Path) -> None:
    """Two workers over gloo: serve, drop into 2 stages mid-generation (one request mid-prefill,
    some waiting, one seeded), serve as a pipeline while a request arrives, restore, finish.
    Every request's tokens equal its tokens alone on a full engine; capacities are exact."""
    r0, r1 = spawn_gloo("drop_restore", stories_dir, tmp_path)
    assert all(r0["tokens"][p] for p in PHASES)  # every phase generated tokens
    assert r0["at_drop"] == {"mid_prefill": ["a1"], "waiting": ["a2"]}
    assert r1["at_drop"]["waiting"] == ["b2"]
    assert r0["held_prompts"] == [True, False]  # only the first pipelined step holds prompts
    rids = requests_for(2)
    assert tokens_by_request([r0, r1]) == {rid: run_alone(stories_dir, rid) for rid in rids}
    assert r0["reports"] == [
        [267, 2 * LAYER_BYTES + EMBED_BYTES + 256, 64],
        [490, 3 * LAYER_BYTES + EMBED_BYTES, 64],
    ]
    # pre-drop requests kept decoding through remote attention while their KV moved; a home
    # attends over its L-layer view only for its own stage's layers still there (stage 1's:
    # stage 0's own layers move at once, no link bytes to wait for)
    for r in (r0, r1):
        assert min(r["counters"].get(k, 0) for k in ("moved", "sent", "served")) > 0
    assert r1["counters"].get("home", 0) > 0
    assert r0["pipelined"]["kv_blocks"] == 267 and r1["pipelined"]["kv_blocks"] == 490
    assert r0["pipelined"]["pool_blocks"] == r1["pipelined"]["pool_blocks"] == 267
    for r in (r0, r1):
        assert r["restored"] == RESTORED | {"stage_loop": False}
    assert {rid: h for rid, h in r0["homes"].items() if rid[0] == "b"} == {
        "b0": 1,
        "b1": 1,
        "b2": 1,
    }


def test_gloo_three_stage_drop_then_restore(stories_dir: Path, tmp_path: Path) -> None:
    """The same with three workers: stages [0, 2), [2, 4), [4, 5); the middle stage forwards
    activations and STOP, and every layer comes back to every worker."""
    results = spawn_gloo("drop_restore", stories_dir, tmp_path, world=3)
    rids = requests_for(3)
    assert tokens_by_request(results) == {rid: run_alone(stories_dir, rid) for rid in rids}
    layers = [r["pipelined"]["layer_range"] for r in results]
    assert layers == [[0, 2], [2, 4], [4, 5]]
    assert len({r["pipelined"]["pool_blocks"] for r in results}) == 1
    for r in results:
        assert r["restored"] == RESTORED | {"stage_loop": False}


def test_gloo_restore_right_after_drop_finishes_the_kv_exchange(
    stories_dir: Path, tmp_path: Path
) -> None:
    """One pipelined step, then a restore: the pre-drop requests' KV has not all moved, so the
    restore moves the rest first; every token is still the same as alone."""
    r0, r1 = spawn_gloo("drop_then_restore_at_once", stories_dir, tmp_path)
    assert r0["legacy_at_restore"]  # some pre-drop KV was still home at the restore
    assert tokens_by_request([r0, r1]) == {
        rid: run_alone(stories_dir, rid) for rid in requests_for(2)
    }
    for r in (r0, r1):
        assert r["restored"] == RESTORED | {"stage_loop": False}


@pytest.mark.parametrize("memory", ["torch", "vmm"])
def test_gloo_live_restore_gathers_kv_home_while_requests_decode(
    stories_dir: Path, tmp_path: Path, memory: str
) -> None:
    """A live restore: the leader begins it, and the group keeps decoding while each step
    gathers a request's KV (one request a step, no byte budget) from both stages onto one
    home; a request that arrived meanwhile waits. Once every running request is home the split
    copies no KV, and every token is the same as alone. On VMM memory the same steps refill
    the dropped weights from the stage that kept them (one region per link a step, into the
    KV tail the drop lent, fenced first), so the split copies no weights either."""
    body = "drop_restore_gathered" + ("_vmm" if memory == "vmm" else "")
    r0, r1 = spawn_gloo(body, stories_dir, tmp_path)
    assert r0["to_gather_at_begin"] > 1
    assert 1 <= r0["gather_steps"] < 60 and r0["to_gather"] == 0
    assert r0["restore_copies"] == 0  # no KV left to copy at the split
    if memory == "vmm":  # 7 regions: embedding, 5 layers, head; each to the other stage
        assert r0["weights_refilled"] == 7 and r0["weights_to_refill"] == 0
        assert r0["gather_steps"] >= 4  # the budget: one region per link a step
        assert min(r["counters"]["weight_bytes"] for r in (r0, r1)) > 0
    else:
        assert r0["weights_refilled"] == 0  # the torch allocator freed them: the split copies
    restored = RESTORED | (VMM_BLOCKS if memory == "vmm" else {}) | {"stage_loop": False}
    assert tokens_by_request([r0, r1]) == {
        rid: run_alone(stories_dir, rid) for rid in requests_for(2)
    }
    for r in (r0, r1):
        assert r["restored"] == restored
        # gathered requests decoded through remote attention on both sides
        assert min(r["counters"].get(k, 0) for k in ("moved", "sent", "served")) > 0


def test_gloo_refused_restore_after_a_partial_gather_keeps_every_token(
    stories_dir: Path, tmp_path: Path
) -> None:
    """A restore refused after two live steps (``restore_cancel``, VMM memory): the gathered
    requests stay home as pre-drop requests, the held request is admitted, the forward exchange
    moves KV again, and the weights refilled so far are forgotten (the fenced KV tail serves
    again); a later, parked restore still gives every request the tokens it gets alone."""
    r0, r1 = spawn_gloo("drop_gather_cancelled_vmm", stories_dir, tmp_path)
    assert r0["gather_steps"] == 2 and r0["to_gather"] > 0
    assert r0["weights_refilled_live"] > 0 and r0["weights_refilled"] == 0
    assert r0["home_at_cancel"] and "late" in r0["held_waiting"]
    assert tokens_by_request([r0, r1]) == {
        rid: run_alone(stories_dir, rid) for rid in requests_for(2)
    }
    for r in (r0, r1):
        assert r["restored"] == RESTORED | VMM_BLOCKS | {"stage_loop": False}


@pytest.mark.parametrize("world", [2, 3])
def test_gloo_one_micro_batch_per_stage_in_flight_keeps_every_token(
    stories_dir: Path, tmp_path: Path, world: int
) -> None:
    """Once the pre-drop KV has moved (here in the first pipelined step), the leader keeps one
    micro-batch per stage in flight: stage r computes one while stage r-1 computes the next.
    Tokens are still each request's tokens alone; the restore starts from a drained pipeline."""
    results = spawn_gloo("drop_restore_overlapped", stories_dir, tmp_path, world=world)
    assert results[0]["max_in_flight"] == world
    assert not results[0]["legacy_at_restore"]
    rids = requests_for(world)
    assert tokens_by_request(results) == {rid: run_alone(stories_dir, rid) for rid in rids}
    for r in results:
        assert r["restored"] == RESTORED | {"stage_loop": False}


def test_stage_graphs_replay_decode_micro_batches_with_the_sametokens_by_request(
    stories_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both stages replay their decode micro-batches through StageGraphs' static buffers (run
    eagerly here, as a graph would record them): the leader loads them from the scheduler, the
    later stage copies the received activations and metadata in. Tokens equal each request's
    alone on a full engine; prefill steps ran through the piecewise graphs' static buffers
    (also eagerly here), decode steps replayed."""
    import workers.pipeline as wp

    monkeypatch.setattr(
        wp, "stage_graphs_for", functools.partial(wp.stage_graphs_for, replay_eagerly=True)
    )
    rids = ["a0", "a1", "a2", "b1"]
    leader, loop, tokens = _run_loopback_pipeline(stories_dir, rids, max_seqs=4)
    assert leader.runner.graphs.num_replays > 0 and loop.graphs.num_replays > 0
    assert leader.runner.graphs.piecewise.num_runs > 0 and loop.graphs.piecewise.num_runs > 0
    assert leader.runner.peak_in_flight == 2
    assert tokens == {rid: run_alone(stories_dir, rid) for rid in rids}


def test_stage_graphs_made_before_a_drop_are_kept_by_the_drop_and_the_next(
    stories_dir: Path,
) -> None:
    """Stage graphs are kept by layer range on the runner: graphs made over a stage model and
    a stage view before any drop (as at start-up) are the ones the drop's own stage model and
    grown view get back (same weights, same base and strides, more blocks), with the new view;
    another range, or a view at another base, gets graphs of its own."""
    config = engine_config(stories_dir, memory_backend="vmm", stage_graphs_at_start=2)
    runner = Engine(config, torch.device("cpu")).runner
    assert runner.stage_graphs == {}  # no graphs on CPU: start-up captured nothing
    memory = VmmStageMemory(runner.memory)
    early, _ = build_stage_model(runner.model, (3, 5))
    before = stage_graphs_for(runner, True, early, memory.view(2))
    point_layers_at_kv_slots(runner.model)  # as capture_stage_graphs leaves the full model
    stage = memory.drop(runner.model, (3, 5))
    view = memory.view(2)
    assert view.shape[0] > before.kv_cache.shape[0]  # the drop grew the view
    kept = stage_graphs_for(runner, True, stage, view)
    assert kept is before and kept.model is stage and kept.kv_cache is view
    assert stage_graphs_for(runner, True, stage, view[1:]) is not kept  # another base
    other, _ = build_stage_model(stage, (3, 4))
    assert stage_graphs_for(runner, True, other, memory.view(1)) is not kept
    assert sorted(runner.stage_graphs) == [(3, 4), (3, 5)]


@pytest.mark.gpu
@pytest.mark.parametrize("gather", [False, True], ids=["parked-restore", "live-gather"])
def test_gpu_nccl_micro_batches_and_stage_graphs_keep_every_token(
    stories_dir: Path, tmp_path: Path, gather: bool
) -> None:
    """The overlapped drop/restore on 2 GPUs over NCCL with the Triton backend: two
    micro-batches in flight (logits back on their own process group), decode micro-batches
    replayed from stage graphs captured on first use; tokens equal each request's alone on a
    full GPU engine. ``live-gather``: the restore first gathers every request's KV home while
    the group decodes, and refills the dropped weights (VMM memory), so the split copies
    neither; its engines capture their stage graphs at start-up (kept at the drop), the other
    run's on first use."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    init = f"tcp://127.0.0.1:{free_port()}"
    args = (2, init, str(stories_dir), str(tmp_path), gather)
    mp.spawn(nccl_main, args=args, nprocs=2, join=True)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert results[0]["max_in_flight"] == 2
    assert all(r["graph_replays"] > 0 for r in results)
    if gather:  # the split copies no KV, and no weights: the live steps refilled them
        assert results[0]["to_gather"] == 0 and results[0]["restore_copies"] == 0
        assert results[0]["weights_refilled"] == 7  # embedding, 5 layers, head
        # stage graphs captured at start-up, kept at the drop (replays then equal tokens)
        assert all(r["stage_graphs_at_drop"] > 0 for r in results)
    else:
        assert all(r["stage_graphs_at_drop"] == 0 for r in results)
    cuda = torch.device("cuda", 0)
    rids = requests_for(2)
    assert tokens_by_request(results) == {
        rid: run_alone(stories_dir, rid, cuda, "triton") for rid in rids
    }


def test_step_token_fill_follows_how_full_steps_are(stories_dir: Path) -> None:
    """EngineStats.step_token_fill (the planner's compute-bound test): chunked prefill steps
    fill the 16-token budget, decode steps of 2 requests fill 1/8 of it."""
    engine = Engine(engine_config(stories_dir, budget=16), CPU)
    assert engine.stats().step_token_fill == 0.0
    engine.add_request(RequestSpec("long", list(range(1, 81)), GREEDY, 30))
    engine.add_request(RequestSpec("other", list(range(1, 41)), GREEDY, 30))
    for _ in range(7):  # 120 prompt tokens in 16-token steps
        engine.step()
    assert engine.stats().step_token_fill > 0.75
    for _ in range(15):
        engine.step()
    assert engine.stats().step_token_fill == pytest.approx(2 / 16, abs=0.02)


def test_profile_decode_times_each_batch_of_the_whole_model(stories_dir: Path) -> None:
    """The start-up profile (CPU: the padded decode step run eagerly): one positive time per
    batch asked for, the KV cache untouched (padding rows write no slot)."""
    engine = Engine(engine_config(stories_dir), CPU)
    runner = engine.runner
    runner.kv_cache.normal_()
    before = runner.kv_cache.clone()
    times = runner.profile_decode([1, 4, 16], repeats=2)
    assert sorted(times) == [1, 4, 16] and all(t > 0 for t in times.values())
    assert torch.equal(runner.kv_cache, before)
    with pytest.raises(ValueError, match="batch sizes must be >= 1"):
        runner.profile_decode([0])


def test_profile_prefill_times_one_prompt_of_the_whole_model(stories_dir: Path) -> None:
    """The start-up prefill profile: a positive time for a 32-token prompt, whose KV lands in
    blocks 0..7 (nothing runs yet); sizes the cache cannot hold are refused."""
    engine = Engine(engine_config(stories_dir), CPU)
    runner = engine.runner
    runner.kv_cache.zero_()
    assert runner.profile_prefill(32, repeats=1) > 0
    assert runner.kv_cache[:8].abs().sum() > 0 and runner.kv_cache[8:].abs().sum() == 0
    with pytest.raises(ValueError, match="num_tokens must be in"):
        runner.profile_prefill(64 * runner.block_size + 1)


def test_gloo_drop_switch_refused_by_one_member_changes_nothing_anywhere(
    stories_dir: Path, tmp_path: Path
) -> None:
    """The members trade their reports themselves (``drop_switch``): one member's refusal
    reaches every member, none waits for another, and each serves on as before."""
    results = spawn_gloo("drop_switch_refused", stories_dir, tmp_path)
    assert "drop cancelled" in results[0]["raised"] and "in group 7" in results[0]["raised"]
    assert "drop cancelled on worker 1" in results[1]["raised"]
    for r in results:
        assert r["describe"]["layer_range"] == [0, 5] and not r["describe"]["stage_loop"]
        assert r["running"] > 0 and all(r["tokens"].values())
