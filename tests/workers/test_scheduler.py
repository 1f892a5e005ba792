"""The vLLM v1 scheduling rules, driven with fake sampled tokens (no model)."""

from __future__ import annotations

import json
from pathlib import Path

from workers.block_pool import BlockPool, KVCacheManager
from workers.config import ModelConfig, SchedulerConfig
from workers.request import FinishReason, Request, RequestStatus
from workers.scheduler import RequestOutput, Scheduler, SchedulerOutput

CONFIGS = Path(__file__).resolve().parents[2] / "workers" / "checkpoint" / "configs"

TOKEN = 7
"""The fake token every step samples unless a test says otherwise (not an EOS)."""


def make_scheduler(
    blocks: int = 64,
    block_size: int = 4,
    budget: int = 16,
    max_num_seqs: int = 256,
    max_model_len: int = 1024,
) -> Scheduler:
    config = SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_num_seqs)
    return Scheduler(config, KVCacheManager(BlockPool(blocks), block_size), max_model_len)


def plan(out: SchedulerOutput) -> list[tuple[str, int, bool]]:
    """(request id, tokens scheduled, samples) per scheduled request, in order."""
    return [(s.request.request_id, s.num_new_tokens, s.samples) for s in out.scheduled]


def step(
    sched: Scheduler, tokens: dict[str, int] | None = None
) -> tuple[list[tuple[str, int, bool]], SchedulerOutput, list[RequestOutput]]:
    """One schedule + update; each sampling request gets ``tokens[id]`` or ``TOKEN``.

    Returns the plan (taken before the update, which advances ``num_computed_tokens``), the
    scheduler output and the request outputs.
    """
    out = sched.schedule()
    planned = plan(out)
    tokens = tokens or {}
    sampled = {rid: tokens.get(rid, TOKEN) for rid, _, samples in planned if samples}
    return planned, out, sched.update(out, sampled)


def run_to_end(sched: Scheduler, tokens: list[int]) -> list[RequestOutput]:
    """Runs one request until it finishes, sampling ``tokens`` in turn; returns all outputs."""
    outputs: list[RequestOutput] = []
    feed = iter(tokens)
    while sched.has_work:
        out = sched.schedule()
        sampled = {s.request.request_id: next(feed) for s in out.scheduled if s.samples}
        outputs += sched.update(out, sampled)
    return outputs


def test_chunked_prefill_then_decode(make_request) -> None:
    sched = make_scheduler(blocks=16, block_size=4, budget=16)
    req = make_request("a", prompt=40, max_tokens=3)
    sched.add(req)
    expected_plans = [[("a", 16, False)], [("a", 16, False)], [("a", 8, True)]]
    expected_plans += [[("a", 1, True)]] * 2
    computed, outputs = [], []
    for expected in expected_plans:
        planned, _, step_outputs = step(sched)
        assert planned == expected
        computed.append(req.num_computed_tokens)
        outputs.append([(o.request_id, o.new_token_ids, o.finish_reason) for o in step_outputs])
    assert computed == [16, 32, 40, 41, 42]
    assert outputs == [
        [],
        [],
        [("a", [TOKEN], None)],
        [("a", [TOKEN], None)],
        [("a", [TOKEN], FinishReason.LENGTH)],
    ]
    assert req.output_token_ids == [TOKEN] * 3
    assert req.status is RequestStatus.FINISHED
    assert not sched.has_work
    assert sched.kv.pool.num_free == 16


def test_chunks_allocate_blocks_as_they_go(make_request) -> None:
    sched = make_scheduler(blocks=16, block_size=4, budget=6)
    req = make_request("a", prompt=15, max_tokens=2)
    sched.add(req)
    blocks = []
    for _ in range(3):
        step(sched)
        blocks.append(list(req.block_ids))
    assert blocks == [[0, 1], [0, 1, 2], [0, 1, 2, 3]]


def test_running_requests_are_scheduled_before_waiting_ones(make_request) -> None:
    sched = make_scheduler(budget=32)
    for rid in "abc":
        sched.add(make_request(rid, prompt=4))
    planned, _, _ = step(sched)
    assert planned == [("a", 4, True), ("b", 4, True), ("c", 4, True)]
    sched.add(make_request("d", prompt=5))
    planned, _, _ = step(sched)
    assert planned == [("a", 1, True), ("b", 1, True), ("c", 1, True), ("d", 5, True)]
    assert [r.request_id for r in sched.running] == ["a", "b", "c", "d"]


def test_waiting_requests_are_admitted_first_come_first_served(make_request) -> None:
    sched = make_scheduler(budget=6)
    for rid in "abc":
        sched.add(make_request(rid, prompt=4))
    planned, _, _ = step(sched)
    assert planned == [("a", 4, True), ("b", 2, False)]
    assert [r.request_id for r in sched.waiting] == ["c"]


def test_decodes_and_a_prefill_chunk_share_the_token_budget(make_request) -> None:
    sched = make_scheduler(budget=6)
    for rid in "abc":
        sched.add(make_request(rid, prompt=4))
    step(sched)  # a:4, b:2
    planned, out, _ = step(sched)
    assert planned == [("a", 1, True), ("b", 2, True), ("c", 3, False)]
    assert out.num_tokens == 6
    planned, _, _ = step(sched)
    assert planned == [("a", 1, True), ("b", 1, True), ("c", 1, True)]


def test_single_token_queries_come_first_in_a_step(make_request) -> None:
    """A step lists its one-token queries first (a mixed step runs their attention with the
    decode kernel), whatever the running order: here b's one-token prompt before a's last
    chunk. The running order itself is kept."""
    sched = make_scheduler(budget=6)
    sched.add(make_request("a", prompt=10))
    sched.add(make_request("b", prompt=1))
    assert step(sched)[0] == [("a", 6, False)]
    assert step(sched)[0] == [("b", 1, True), ("a", 4, True)]
    assert [r.request_id for r in sched.running] == ["a", "b"]


def test_max_num_seqs_caps_running_requests(make_request) -> None:
    sched = make_scheduler(budget=64, max_num_seqs=2)
    sched.add(make_request("a", prompt=2, max_tokens=1))
    sched.add(make_request("b", prompt=2))
    sched.add(make_request("c", prompt=2))
    planned, _, outputs = step(sched)
    assert planned == [("a", 2, True), ("b", 2, True)]
    assert [(o.request_id, o.finish_reason) for o in outputs] == [
        ("a", FinishReason.LENGTH),
        ("b", None),
    ]
    planned, _, _ = step(sched)  # a finished, so c fits
    assert planned == [("b", 1, True), ("c", 2, True)]


def test_preemption_takes_the_newest_running_request_first(make_request) -> None:
    sched = make_scheduler(blocks=3, block_size=4, budget=16)
    reqs = {rid: make_request(rid, prompt=4) for rid in "abc"}
    for r in reqs.values():
        sched.add(r)
    step(sched)  # each holds one full block and now has 5 tokens
    planned, out, outputs = step(sched)
    # a needs a second block: c (newest) goes. b then needs one: b is the newest left.
    assert planned == [("a", 1, True)]
    assert [r.request_id for r in out.preempted] == ["c", "b"]
    assert [o.request_id for o in outputs] == ["a"]
    assert [r.request_id for r in sched.running] == ["a"]
    assert [r.request_id for r in sched.waiting] == ["b", "c"]
    assert reqs["a"].block_ids == [0, 2]
    for rid in "bc":
        r = reqs[rid]
        assert (r.status, r.num_computed_tokens, r.block_ids) == (RequestStatus.PREEMPTED, 0, [])
        assert r.output_token_ids == [TOKEN]  # sampled tokens survive; their KV is recomputed
        assert r.num_preemptions == 1
    assert sched.num_preemptions == 2
    assert sched.kv.pool.num_free == 1
    sched.kv.pool.check_integrity()


def test_no_waiting_admission_in_a_step_that_preempted(make_request) -> None:
    sched = make_scheduler(blocks=4, block_size=4, budget=9)
    a, c = make_request("a", prompt=4), make_request("c", prompt=12)
    sched.add(a)
    sched.add(c)
    planned, _, _ = step(sched)
    assert planned == [("a", 4, True), ("c", 5, False)]
    assert (a.block_ids, c.block_ids) == ([0], [1, 2])
    planned, out, _ = step(sched)
    # c's next chunk (7 tokens) needs a third block; c is the newest, so it preempts itself.
    assert planned == [("a", 1, True)]
    assert out.preempted == [c]
    assert (c.status, c.num_computed_tokens, c.block_ids) == (RequestStatus.PREEMPTED, 0, [])
    # 2 free blocks and 8 tokens of budget would take an 8-token chunk of c, but not this step.
    assert (sched.kv.pool.num_free, list(sched.waiting)) == (2, [c])
    planned, _, _ = step(sched)
    assert planned == [("a", 1, True), ("c", 8, False)]
    assert c.status is RequestStatus.RUNNING


def test_preempted_request_resumes_by_recomputing_its_tokens(make_request) -> None:
    sched = make_scheduler(blocks=3, block_size=4, budget=16)
    a, b = make_request("a", prompt=4, max_tokens=2), make_request("b", prompt=6, max_tokens=3)
    sched.add(a)
    sched.add(b)
    step(sched, {"a": 11, "b": 21})
    planned, out, _ = step(sched, {"a": 12})  # a needs a block: b preempted
    assert (planned, out.preempted) == ([("a", 1, True)], [b])
    assert a.is_finished  # a's 2 tokens are done; its blocks come back
    planned, _, outputs = step(sched, {"b": 22})
    assert planned == [("b", 7, True)]  # 6 prompt + 1 output token recomputed
    assert b.output_token_ids == [21, 22]
    assert [(o.request_id, o.new_token_ids, o.num_preemptions) for o in outputs] == [("b", [22], 1)]


def test_abort_from_waiting_returns_an_abort_output(make_request) -> None:
    sched = make_scheduler(budget=4)
    sched.add(make_request("a", prompt=4))
    sched.add(make_request("b", prompt=4))
    step(sched)
    out = sched.abort("b")
    assert (out.request_id, out.new_token_ids, out.finish_reason) == ("b", [], FinishReason.ABORT)
    assert [r.request_id for r in sched.waiting] == []
    assert sched.abort("b") is None
    assert sched.abort("nope") is None


def test_abort_from_running_frees_its_blocks(make_request) -> None:
    sched = make_scheduler(blocks=8, block_size=4, budget=16)
    a, b = make_request("a", prompt=9), make_request("b", prompt=3)
    sched.add(a)
    sched.add(b)
    step(sched)
    assert sched.kv.pool.num_free == 4
    out = sched.abort("a")
    assert (out.request_id, out.new_token_ids, out.finish_reason) == ("a", [], FinishReason.ABORT)
    assert (a.status, a.finish_reason, a.block_ids) == (
        RequestStatus.FINISHED,
        FinishReason.ABORT,
        [],
    )
    assert sched.kv.pool.num_free == 7
    assert [r.request_id for r in sched.running] == ["b"]
    sched.kv.pool.check_integrity()


def test_abort_between_schedule_and_update_drops_the_sample(make_request) -> None:
    sched = make_scheduler(blocks=8, budget=16)
    sched.add(make_request("a", prompt=4))
    sched.add(make_request("b", prompt=4))
    out = sched.schedule()
    sched.abort("a")
    outputs = sched.update(out, {"a": TOKEN, "b": TOKEN})
    assert [o.request_id for o in outputs] == ["b"]
    assert sched.kv.pool.num_free == 7


def test_stop_on_eos(make_request) -> None:
    sched = make_scheduler()
    sched.add(make_request("a", max_tokens=10))
    outputs = run_to_end(sched, [5, 6, 2, 9])
    assert [o.new_token_ids for o in outputs] == [[5], [6], [2]]
    assert (outputs[-1].finish_reason, outputs[-1].stop_token_id) == (FinishReason.STOP, 2)
    assert sched.kv.pool.num_free == 64


def test_stop_on_stop_token_ids(make_request) -> None:
    sched = make_scheduler()
    sched.add(make_request("a", max_tokens=10, stop_token_ids=(50, 51)))
    outputs = run_to_end(sched, [5, 51, 9])
    assert [o.new_token_ids for o in outputs] == [[5], [51]]
    assert (outputs[-1].finish_reason, outputs[-1].stop_token_id) == (FinishReason.STOP, 51)


def test_stop_on_max_tokens(make_request) -> None:
    sched = make_scheduler()
    sched.add(make_request("a", max_tokens=3))
    outputs = run_to_end(sched, [5, 6, 7, 8])
    assert [o.finish_reason for o in outputs] == [None, None, FinishReason.LENGTH]
    assert outputs[-1].stop_token_id is None


def test_stop_on_max_model_len(make_request) -> None:
    sched = make_scheduler(max_model_len=6)
    req = make_request("a", prompt=4, max_tokens=100)
    sched.add(req)
    outputs = run_to_end(sched, [5, 6, 7])
    assert [o.finish_reason for o in outputs] == [None, FinishReason.LENGTH]
    assert req.num_tokens == 6


def test_min_tokens_defers_eos_and_stop_token_ids(make_request) -> None:
    sched = make_scheduler()
    sched.add(make_request("a", max_tokens=10, min_tokens=3, stop_token_ids=(50,)))
    outputs = run_to_end(sched, [2, 50, 2, 9])
    assert [o.new_token_ids for o in outputs] == [[2], [50], [2]]
    assert [o.finish_reason for o in outputs] == [None, None, FinishReason.STOP]


def test_min_tokens_does_not_extend_max_tokens(make_request) -> None:
    req = make_request("a", max_tokens=2, min_tokens=2)
    req.output_token_ids += [5, 6]
    assert req.check_stop(max_model_len=100) is FinishReason.LENGTH


def test_ignore_eos_keeps_going_but_stop_token_ids_still_stop(make_request) -> None:
    sched = make_scheduler()
    sched.add(make_request("a", max_tokens=10, ignore_eos=True, stop_token_ids=(50,)))
    outputs = run_to_end(sched, [2, 2, 50, 9])
    assert [o.new_token_ids for o in outputs] == [[2], [2], [50]]
    assert (outputs[-1].finish_reason, outputs[-1].stop_token_id) == (FinishReason.STOP, 50)


def test_check_stop_reasons(make_request) -> None:
    cases: list[tuple[Request, FinishReason | None]] = [
        (make_request("eos"), FinishReason.STOP),
        (make_request("ignore", ignore_eos=True), None),
        (make_request("min", min_tokens=2), None),
        (make_request("other-eos", eos=frozenset({3})), None),
    ]
    for req, expected in cases:
        req.output_token_ids.append(2)
        assert req.check_stop(max_model_len=100) is expected, req.request_id


def test_waiting_demand_counts_the_queue_and_preempted_requests(make_request) -> None:
    sched = make_scheduler(blocks=3, block_size=4, budget=16)
    for rid in "abc":
        sched.add(make_request(rid, prompt=4))
    assert (sched.kv_demand_blocks(), sched.waiting_demand_blocks()) == (3, 3)
    step(sched)  # each holds one block and now has 5 tokens
    assert (sched.kv_demand_blocks(), sched.waiting_demand_blocks()) == (6, 0)
    step(sched)  # a needs a second block: c and b are preempted with 5 tokens each
    assert [r.request_id for r in sched.waiting] == ["b", "c"]
    assert (sched.kv_demand_blocks(), sched.waiting_demand_blocks()) == (6, 4)


def test_a_decode_goes_before_an_earlier_prompts_chunk(make_request) -> None:
    """A request admitted after a long prompt decodes ahead of that prompt's next chunk,
    which takes what is left of the budget (running in admission order, the chunk took all
    of it and the decode waited a whole step)."""
    sched = make_scheduler(blocks=32, block_size=4, budget=8)
    sched.add(make_request("short", prompt=2))
    sched.add(make_request("long", prompt=30))
    first = sched.schedule()
    assert plan(first) == [("short", 2, True), ("long", 6, False)]
    sched.update(first, {"short": TOKEN})
    sched.running.reverse()  # as if long had been admitted first (a preempted prompt re-run)
    assert plan(sched.schedule()) == [("short", 1, True), ("long", 7, False)]


def test_a_prompts_next_chunk_follows_the_one_in_flight(make_request) -> None:
    """Pipeline mode: a prompt whose chunk is in flight gets its next chunk in the next
    micro-batch, from where that one ends, unless the chunk in flight samples; the chunks
    are applied in order, and its first token is sampled once."""
    sched = make_scheduler(blocks=32, block_size=4, budget=8)
    long = make_request("long", prompt=22)
    sched.add(long)
    first = sched.schedule()
    second = sched.schedule(busy={"long"})
    third = sched.schedule(busy={"long"})
    assert [(s.start, s.num_new_tokens, s.samples) for o in (first, second, third)
            for s in o.scheduled] == [(0, 8, False), (8, 8, False), (16, 6, True)]  # fmt: skip
    assert len(long.block_ids) == 6  # 22 tokens of 4 per block
    assert plan(sched.schedule(busy={"long"})) == []  # its last chunk in flight samples
    assert long.num_computed_tokens == 0 and long.num_pending_tokens == 0
    sched.update(first, {})
    sched.update(second, {})
    assert long.num_computed_tokens == 16 and long.num_pending_tokens == 0
    outputs = sched.update(third, {"long": TOKEN})
    assert [o.new_token_ids for o in outputs] == [[TOKEN]]
    assert plan(sched.schedule()) == [("long", 1, True)]
    assert sched.running[0].num_started_tokens == 23
    sched.kv.pool.check_integrity()


def test_a_chained_chunk_short_of_blocks_waits_and_preempts_nothing(make_request) -> None:
    """A prompt's next chunk finds no block while its last chunk is in flight: the request
    is busy, so it is neither preempted nor preempts itself; the micro-batch stays empty
    and the chunk's tokens stay pending."""
    sched = make_scheduler(blocks=4, block_size=4, budget=8)
    long = make_request("long", prompt=30)
    sched.add(long)
    first = sched.schedule()  # 8 tokens, 2 blocks
    second = sched.schedule(busy={"long"})  # 8 more, the last 2 blocks
    third = sched.schedule(busy={"long"})
    assert plan(first) == plan(second) == [("long", 8, False)]
    assert plan(third) == [] and not third.preempted
    assert long.status is RequestStatus.RUNNING and long.num_pending_tokens == 14
    assert long.num_scheduled_tokens == 16 and len(long.block_ids) == 4
    sched.kv.pool.check_integrity()


def test_a_prompt_chunk_short_of_blocks_never_preempts_a_decode_scheduled_before_it(
    make_request,
) -> None:
    """Decodes go first, so a newer request may already be in the step when an older
    prompt's chunk finds no block: the chunk's own request is preempted, not the newer one
    (preempting it would leave a scheduled request without its blocks)."""
    sched = make_scheduler(blocks=4, block_size=4, budget=8)
    sched.add(make_request("b", prompt=4))
    sched.add(make_request("a", prompt=16))
    first = sched.schedule()  # b: 4 (1 block); a: 4 of 16 (1 block)
    sched.update(first, {"b": TOKEN})
    sched.running.reverse()  # as if a had been admitted first (a preempted prompt re-run)
    out = sched.schedule()  # b's decode takes a block; a's 7-token chunk finds one of two
    assert plan(out) == [("b", 1, True)]
    assert [r.request_id for r in out.preempted] == ["a"]
    assert all(s.request.status is RequestStatus.RUNNING for s in out.scheduled)
    sched.kv.pool.check_integrity()


def test_micro_batches_skip_busy_requests_and_never_preempt_them(make_request) -> None:
    """Pipeline mode: requests of a micro-batch in flight are neither scheduled again nor
    preempted; ``micro_batches`` spreads the decodes over micro-batches."""
    sched = make_scheduler(blocks=4, block_size=4, budget=16)
    reqs = {rid: make_request(rid, prompt=4) for rid in "abcd"}
    for r in reqs.values():
        sched.add(r)
    step(sched)  # each holds one full block; the next token needs another
    first = sched.schedule(micro_batches=2)
    assert plan(first) == [("a", 1, True), ("b", 1, True)]  # no free block: preempts d, c
    assert [r.request_id for r in first.preempted] == ["d", "c"]
    busy = {"a", "b"}
    second = sched.schedule(busy, micro_batches=2)
    assert plan(second) == [] and not second.preempted  # only busy requests are running
    sched.update(first, {"a": TOKEN, "b": TOKEN})
    sched.kv.pool.check_integrity()


def test_a_micro_batch_takes_only_idle_requests(make_request) -> None:
    sched = make_scheduler(blocks=16, block_size=4, budget=16)
    for rid in "abcd":
        sched.add(make_request(rid, prompt=3))
    step(sched)
    first = sched.schedule(micro_batches=2)
    second = sched.schedule({"a", "b"}, micro_batches=2)
    assert plan(first) == [("a", 1, True), ("b", 1, True)]
    assert plan(second) == [("c", 1, True), ("d", 1, True)]


def test_a_long_prompts_chunks_follow_each_other_past_the_decode_limit(make_request) -> None:
    """Pipeline mode: ``micro_batches`` spreads the decodes over the micro-batches in
    flight, and a prompt mid-prefill does not count against their share. Counted, the decodes filled the
    second micro-batch and the long prompt's next chunk waited for the third, with a fresh
    prompt's first chunk in its place: two micro-batches of unequal cost (module docstring)."""
    sched = make_scheduler(blocks=64, block_size=4, budget=64)
    for rid in "abcd":
        sched.add(make_request(rid, prompt=3))
    step(sched)  # a-d decode from now on
    sched.add(make_request("long", prompt=40))
    sched.add(make_request("fresh", prompt=20))
    first = sched.schedule(micro_batches=2, token_budget=10)
    second = sched.schedule({"a", "b", "long"}, micro_batches=2, token_budget=10)
    assert plan(first) == [("a", 1, True), ("b", 1, True), ("long", 8, False)]
    assert plan(second) == [("c", 1, True), ("d", 1, True), ("long", 8, False)]
    assert [s.start for s in second.scheduled] == [3, 3, 8]  # the chunk after the first
    assert [r.request_id for r in sched.waiting] == ["fresh"]


def test_a_chunks_attention_cost_fits_the_budget_exactly() -> None:
    """``chunk_tokens`` with a break-even context: the longest chunk whose cost
    n * (1 + (start + (n - 1) / 2) / kappa) fits, so the next token would not; without one,
    tokens at one each; a decode costs 1; an empty batch always takes a token."""
    from workers.scheduler import chunk_tokens

    def cost(n: int, start: int, kappa: float) -> float:
        return n * (1 + (start + (n - 1) / 2) / kappa)

    for start, budget, kappa in [(0, 1024, 18_637.0), (6144, 1024, 18_637.0), (512, 64, 128.0),
                                 (0, 7.5, 3.0), (10_000, 100, 50.0)]:  # fmt: skip
        n, spent = chunk_tokens(10**6, start, budget, kappa)
        assert spent == cost(n, start, kappa) <= budget < cost(n + 1, start, kappa)
        if n > 0:  # fewer pending tokens than fit: all of them
            assert chunk_tokens(n - 1, start, budget, kappa) == (n - 1, cost(n - 1, start, kappa))
    # Llama-3-8B: 1,024 tokens 6,144 deep cost 1.32x a first chunk's (1.31-1.37x measured on
    # an H200, docs/benchmarks.md session 21), so such a chunk gets 758
    config = json.loads((CONFIGS / "llama-3-8b" / "config.json").read_text())
    kappa = ModelConfig.from_hf_dict(config).attention_break_even
    assert round(kappa) == 18_637
    assert chunk_tokens(10**6, 6144, 1024, kappa)[0] == 758
    assert chunk_tokens(10**6, 0, 1024, kappa)[0] == 997
    assert chunk_tokens(500, 6144, 1024, None) == (500, 500.0)
    assert chunk_tokens(5000, 6144, 1024.5, None) == (1024, 1024.0)
    assert chunk_tokens(1, 6144, 0.5, 18_637.0) == (0, 0.0)  # a decode: 1, which does not fit
    assert chunk_tokens(40, 10**6, 8, 10.0) == (0, 0.0)
    assert chunk_tokens(40, 10**6, 8, 10.0, first=True)[0] == 1


def test_attention_cost_gives_a_deep_chunk_fewer_tokens(make_request) -> None:
    """With ``break_even`` (pipeline_chunk_cost="attention") a long prompt's chunk deep in it
    takes fewer tokens than its first one; decodes still cost one token each, and what is
    left goes to the next prompt."""
    sched = make_scheduler(blocks=256, block_size=4, budget=64)
    sched.add(make_request("a", prompt=3))
    step(sched)  # a decodes from now on
    sched.add(make_request("long", prompt=600))
    sched.add(make_request("next", prompt=50))
    first = sched.schedule(token_budget=64, break_even=128.0)
    assert plan(first) == [("a", 1, True), ("long", 52, False)]  # 52 cost 62.4 of 63, 53 63.8
    sched.update(first, {"a": TOKEN})
    for _ in range(8):  # "long" prefills on: its chunks shrink as its context grows
        out = sched.schedule(token_budget=64, break_even=128.0)
        sched.update(out, {"a": TOKEN})
    deep = sched.schedule(token_budget=64, break_even=128.0)
    (s,) = [s for s in deep.scheduled if s.request.request_id == "long"]
    assert s.start > 200 and s.num_new_tokens < 30
    tokens = plan(sched.schedule(token_budget=64))  # the token budget: 63 after a's decode
    assert sum(n for _, n, _ in tokens) == 64


def test_a_trimmed_chunk_grows_into_the_rows_its_graph_pads(make_request) -> None:
    """With ``break_even`` and ``padded_size`` (a stage's piecewise graphs run a batch at their
    next captured size), the last prompt chunk grows into the padding rows, computed anyway;
    never past its prompt (the final chunk then samples), and not without ``break_even``."""

    def sizes(n: int) -> int | None:
        return next((s for s in (16, 32, 64) if s >= n), None)

    sched = make_scheduler(blocks=256, block_size=4, budget=64)
    sched.add(make_request("a", prompt=3))
    step(sched)  # a decodes from now on
    sched.add(make_request("long", prompt=600))
    first = sched.schedule(token_budget=64, break_even=128.0)  # a: 1, long: 52 by cost
    sched.update(first, {"a": TOKEN})
    deep = sched.schedule(token_budget=64, break_even=128.0, padded_size=sizes)
    assert [s.num_new_tokens for s in deep.scheduled] == [1, 63]  # 1 + 40 by cost, padded to 64
    assert deep.scheduled[1].start == 52 and deep.num_tokens == 64
    long = deep.scheduled[1].request
    assert long.num_scheduled_tokens == 115 and len(long.block_ids) == 29  # 115 slots
    sched.update(deep, {"a": TOKEN})
    sched.kv.pool.check_integrity()

    short = make_scheduler(blocks=256, block_size=4, budget=64)
    short.add(make_request("b", prompt=20))
    out = short.schedule(token_budget=64, break_even=128.0, padded_size=sizes)
    assert plan(out) == [("b", 20, True)]  # padded to 32, but the prompt has 20 tokens
    plain = make_scheduler(blocks=256, block_size=4, budget=64)
    plain.add(make_request("c", prompt=100))
    assert plan(plain.schedule(token_budget=40, padded_size=sizes)) == [("c", 40, False)]


def test_token_budget_overrides_the_step_budget(make_request) -> None:
    """A pipeline leader passes its micro-batch budget (SchedulerConfig's
    pipeline_max_num_batched_tokens) per call; without it the step budget applies."""
    import pytest

    sched = make_scheduler(blocks=32, block_size=4, budget=16)
    sched.add(make_request("a", prompt=40, max_tokens=3))
    sched.add(make_request("b", prompt=8, max_tokens=3))
    assert plan(sched.schedule(token_budget=6)) == [("a", 6, False)]
    assert SchedulerConfig(max_num_batched_tokens=16).pipeline_token_budget == 16
    assert SchedulerConfig(max_num_batched_tokens=8192).pipeline_token_budget == 1024
    config = SchedulerConfig(max_num_batched_tokens=16, pipeline_max_num_batched_tokens=4)
    assert config.pipeline_token_budget == 4
    with pytest.raises(ValueError, match="pipeline_max_num_batched_tokens"):
        SchedulerConfig(pipeline_max_num_batched_tokens=0)


def test_a_step_that_admits_nothing_still_runs_decodes_and_prefill_chunks(make_request) -> None:
    """``admit=False`` (a pipeline group's first step after a drop): running requests are
    scheduled as usual, a decode and a prefill chunk alike; no waiting request starts."""
    sched = make_scheduler(budget=8)
    sched.add(make_request("a", prompt=4))
    sched.add(make_request("b", prompt=12))
    step(sched)  # a: 4 (prefilled), b: 4 of 12
    sched.add(make_request("c", prompt=4))
    assert plan(sched.schedule(admit=False)) == [("a", 1, True), ("b", 7, False)]
    assert [r.request_id for r in sched.waiting] == ["c"]


def test_a_decodes_only_step_skips_prefill_chunks_and_starts_no_request(make_request) -> None:
    """``decodes_only`` (a drop is about to park the engine): only running requests with one
    token to compute run; a prompt mid-prefill and a waiting one wait for the next step."""
    sched = make_scheduler(budget=8)
    sched.add(make_request("a", prompt=4))
    sched.add(make_request("b", prompt=12))
    step(sched)  # a: 4 (prefilled), b: 4 of 12
    sched.add(make_request("c", prompt=4))
    sched.add(make_request("d", prompt=1))  # waiting, even with one token to compute
    held = sched.schedule(decodes_only=True)
    assert plan(held) == [("a", 1, True)]
    assert [r.request_id for r in sched.waiting] == ["c", "d"]
    sched.update(held, {"a": TOKEN})
    assert plan(sched.schedule()) == [("a", 1, True), ("b", 7, False)]


def test_a_request_awaiting_its_token_is_never_preempted(make_request) -> None:
    """A pipeline leader schedules the next micro-batch between ``advance`` and ``resolve``
    (workers/engine.py): the requests just sampled hold placeholders, and preempting one
    would drop the token in flight. A request short of blocks then preempts itself, or waits
    a step when the only candidates await their tokens."""
    sched = make_scheduler(blocks=3, block_size=4, budget=16)
    b, a = make_request("b", prompt=4), make_request("a", prompt=4)
    sched.add(b)
    sched.add(a)
    step(sched)  # one block each, one token each; one block left
    k = sched.schedule(busy={"b"})  # a's decode takes the last block
    assert plan(k) == [("a", 1, True)]
    sched.advance(k)
    assert a.awaits_token and not b.awaits_token
    out = sched.schedule()  # b needs a block: the newest running (a) awaits its token
    assert [r.request_id for r in out.preempted] == ["b"] and a.status is RequestStatus.RUNNING
    assert sched.resolve(k, {"a": 9})[0].new_token_ids == [9]
    assert a.output_token_ids == [TOKEN, 9] and not a.awaits_token
    sched.kv.pool.check_integrity()

    alone = make_scheduler(blocks=2, block_size=4, budget=16)
    c = make_request("c", prompt=7)
    alone.add(c)
    step(alone)  # 8 tokens in 2 blocks
    k = alone.schedule()
    alone.advance(k)  # c's next token, at position 8, needs a third block
    out = alone.schedule()
    assert plan(out) == [] and not out.preempted and c.status is RequestStatus.RUNNING
    alone.resolve(k, {"c": 9})
    assert c.output_token_ids == [TOKEN, 9]
