"""The coordinator core without Ray: routing, admission, output ordering, stop strings, abort,
and failing the requests of a dead worker."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from coordinator.coordinator import Coordinator, OverloadedError, ServerUnavailableError
from coordinator.metrics import Metrics
from coordinator.request_state import Delta, Finished
from coordinator.validation import ModelLimits, ParsedRequest
from planner.types import InstanceState
from workers.engine import EngineStats
from workers.request import FinishReason, SamplingParams
from workers.scheduler import RequestOutput
from workers.tokenizer import Tokenizer
from workers.worker import StepResult, WorkerInfo

STORIES = Path(__file__).parents[1] / "fixtures" / "stories260K"


class _Method:
    def __init__(self, fn) -> None:
        self.fn = fn
        self.calls: list = []

    def remote(self, *args):
        self.calls.append(args)
        return self.fn(*args)


class FakeWorker:
    """Records actor calls; ``stats`` answers from ``self.stats_value`` or raises ``dead``."""

    def __init__(self, stats: EngineStats) -> None:
        self.stats_value = stats
        self.dead: BaseException | None = None
        self.add_requests = _Method(lambda specs: None)
        self.abort = _Method(lambda ids: None)
        self.stats = _Method(self._stats)

    async def _stats(self) -> EngineStats:
        if self.dead is not None:
            raise self.dead
        return self.stats_value


def make_stats(total: int = 100, waiting: int = 0) -> EngineStats:
    return EngineStats(
        num_running=0,
        num_waiting=waiting,
        kv_blocks_total=total,
        kv_blocks_used=0,
        kv_block_bytes=20480,
        kv_demand_blocks=0,
        num_preemptions=0,
    )


def make_coordinator(n: int = 2, max_waiting: int = 8, totals=(100, 100)):
    tok = Tokenizer(STORIES)
    core = Coordinator(
        tok,
        ModelLimits("stories", 512, 512),
        Metrics("stories"),
        block_size=16,
        max_waiting=max_waiting,
        overload_policy="recompute",
    )
    workers = [FakeWorker(make_stats(totals[i])) for i in range(n)]
    infos = [WorkerInfo(i, "cpu", (0, 5), 512, make_stats(totals[i])) for i in range(n)]
    core.attach(workers, infos)
    return core, workers


def parsed(n_tokens: int, **sampling) -> ParsedRequest:
    return ParsedRequest([1] + [300] * (n_tokens - 1), SamplingParams(**sampling), 16, True)


def drain(state) -> list:
    events = []
    while not state.queue.empty():
        events.append(state.queue.get_nowait())
    return events


def step(rank: int, seq: int, outputs: list[RequestOutput]) -> StepResult:
    return StepResult(rank, seq, outputs, make_stats())


def test_routes_to_lowest_kv_demand_fraction() -> None:
    core, workers = make_coordinator(totals=(100, 50))
    a = core.submit("a", parsed(160))  # 10 blocks -> instance 0 (tie on 0 demand: lower id)
    b = core.submit("b", parsed(16))  # 0 (10/100) vs 1 (0/50): instance 1
    c = core.submit("c", parsed(96))  # 0: 10/100 = 0.10, 1: 1/50 = 0.02 -> 1
    d = core.submit("d", parsed(16))  # 0: 0.10, 1: 7/50 = 0.14 -> 0
    assert [s.instance_id for s in (a, b, c, d)] == [0, 1, 1, 0]
    assert [call[0][0].request_id for call in workers[1].add_requests.calls] == ["b", "c"]


def test_admission_and_unavailable() -> None:
    core, _ = make_coordinator(max_waiting=3)
    core.instances[0].stats = make_stats(waiting=2)
    core.instances[1].stats = make_stats(waiting=1)
    with pytest.raises(OverloadedError, match="3 requests are waiting"):
        core.submit("x", parsed(4))
    core.ready = False
    with pytest.raises(ServerUnavailableError):
        core.submit("y", parsed(4))


def test_duplicate_request_id_is_invalid() -> None:
    core, _ = make_coordinator()
    core.submit("same", parsed(4))
    with pytest.raises(ValueError, match="request_id"):
        core.submit("same", parsed(4))


def test_pushes_apply_in_step_order() -> None:
    core, _ = make_coordinator()
    state = core.submit("r", parsed(4))
    core.on_step(step(0, 2, [RequestOutput("r", [401])]))
    assert drain(state) == []  # step 2 waits for step 1
    core.on_step(step(0, 1, [RequestOutput("r", [400])]))
    assert [e.token_ids for e in drain(state)] == [[400], [401]]


def test_stop_string_finishes_here_and_aborts_on_worker() -> None:
    core, workers = make_coordinator()
    tok = core.tokenizer
    state = core.submit("s", parsed(4, stop=("Lily",)))
    text_ids = tok.encode("there was a girl named Lily who", add_special_tokens=False)
    for i, t in enumerate(text_ids):
        core.on_step(step(0, i + 1, [RequestOutput("s", [t])]))
        if "s" not in core.requests:
            break
    events = drain(state)
    fin = events[-1]
    assert isinstance(fin, Finished) and fin.reason is FinishReason.STOP
    assert fin.stop_string == "Lily"
    text = "".join(e.text for e in events if isinstance(e, Delta))
    assert text.endswith("named ") and "Lily" not in text
    assert workers[0].abort.calls == [(["s"],)]


def test_abort_finishes_stream_and_frees_on_worker() -> None:
    core, workers = make_coordinator()
    state = core.submit("a", parsed(4))
    assert core.abort(["a", "unknown"]) == ["a"]
    (fin,) = drain(state)
    assert fin.reason is FinishReason.ABORT
    assert workers[0].abort.calls == [(["a"],)]
    assert core.instances[0].live == set()


def test_dead_worker_fails_its_requests_and_stops_routing_there() -> None:
    core, workers = make_coordinator()
    on_0 = core.submit("a", parsed(16))
    on_1 = core.submit("b", parsed(16))
    assert (on_0.instance_id, on_1.instance_id) == (0, 1)
    workers[1].dead = RuntimeError("actor died")

    async def one_round() -> None:
        task = asyncio.ensure_future(core.monitor(interval_s=10.0))
        await asyncio.sleep(0.05)
        task.cancel()

    asyncio.run(one_round())
    assert core.instances[1].state is InstanceState.FAILED
    (fin,) = drain(on_1)
    assert fin.reason is FinishReason.ABORT and "instance 1" in fin.error
    assert drain(on_0) == []  # the other instance's request keeps running
    assert core.submit("c", parsed(4)).instance_id == 0


def test_late_push_is_reported_once_per_second(caplog: pytest.LogCaptureFixture) -> None:
    import logging
    import time

    core, _ = make_coordinator()
    with caplog.at_level(logging.WARNING, logger="workers.stalls"):
        core.on_step(StepResult(0, 1, [], make_stats(), time.time()))  # on time
        assert not caplog.records
        for seq in (2, 3, 4):  # a stall delayed three pushes by ~1.5 s
            core.on_step(StepResult(0, seq, [], make_stats(), time.time() - 1.5))
    late = [r.getMessage() for r in caplog.records]
    assert len(late) == 1 and "late from worker 0: 1 late, the worst by 15" in late[0]
    assert core.applied_seq(0) == 4  # late pushes still apply, in order


def test_stream_coalesces_deltas_queued_behind_the_first() -> None:
    from coordinator.frontend import _coalesced

    async def main():
        q: asyncio.Queue = asyncio.Queue()
        first = Delta([5], "a", [(-0.1, [5], [-0.1])])
        for ev in (
            Delta([6], "b", [(-0.2, [6], [-0.2])]),
            Delta([7, 8], "cd", [(-0.3, [7], [-0.3]), (-0.4, [8], [-0.4])]),
            Finished(FinishReason.LENGTH, 3, 4),
        ):
            q.put_nowait(ev)
        merged = _coalesced(first, q)
        assert len(merged) == 2 and isinstance(merged[1], Finished) and q.empty()
        assert (merged[0].token_ids, merged[0].text) == ([5, 6, 7, 8], "abcd")
        assert [lp[0] for lp in merged[0].logprobs] == [-0.1, -0.2, -0.3, -0.4]
        assert first.token_ids == [5]  # the queued events are not modified
        q.put_nowait(Delta([9], "e"))
        assert _coalesced(Delta([1], "x"), q)[0].token_ids == [1, 9]
        assert _coalesced(Delta([2], "y"), q) == [Delta([2], "y")]  # nothing queued

    asyncio.run(main())


def test_output_that_fails_to_process_ends_only_its_request() -> None:
    """A fault while folding one request's output (here its detokenizer raises) ends that
    request with an error and aborts it on its worker; the other request in the same push,
    and every later push of that worker, still apply."""

    async def main():
        core, workers = make_coordinator()
        bad, good = core.submit("bad", parsed(4)), core.submit("good", parsed(4))

        def boom(ids):
            raise RuntimeError("detokenizer state broken")

        bad.detokenizer.step = boom
        rank = bad.instance_id
        assert good.instance_id != rank  # routed apart: put both on one worker's push
        core.move_requests(["good"], core.instances[rank])
        core.on_step(step(rank, 1, [RequestOutput("bad", [5]), RequestOutput("good", [6])]))
        core.on_step(step(rank, 2, [RequestOutput("good", [7])]))
        fin = drain(bad)[-1]
        assert isinstance(fin, Finished) and "detokenizer state broken" in fin.error
        assert "bad" not in core.requests
        assert workers[rank].abort.calls == [(["bad"],)]
        assert [ev.token_ids for ev in drain(good)] == [[6], [7]]
        assert core.applied_seq(rank) == 2

    asyncio.run(main())


@pytest.mark.parametrize("ended_at", ["write", "queue"])
def test_a_stream_ended_by_the_client_aborts_its_request(ended_at: str) -> None:
    """grpc-aio ends a cancelled stream where its handler waits: at the queue (CancelledError
    inside the generator) or writing a response (the generator, suspended at its ``yield``,
    is closed: GeneratorExit). Both must abort the request here and on its worker."""
    from coordinator.frontend import InferenceServicer
    from proto.kunserve.v1 import inference_pb2 as pb

    async def main() -> None:
        core, workers = make_coordinator()
        servicer = InferenceServicer(core, None, None)
        req = pb.GenerateRequest(request_id="c", token_ids=pb.TokenIds(ids=[1, 300, 300]))
        stream = servicer.Generate(req, None)
        first = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0)
        assert "c" in core.requests
        core.on_step(step(0, 1, [RequestOutput("c", [300])]))
        assert (await first).delta.token_ids == [300]  # suspended at its yield
        if ended_at == "write":
            await stream.aclose()
        else:
            pending = asyncio.ensure_future(stream.__anext__())
            await asyncio.sleep(0)  # now waiting at the queue
            pending.cancel()
            with pytest.raises(asyncio.CancelledError):
                await pending
        assert "c" not in core.requests
        assert core.instances[0].live == set()
        assert workers[0].abort.calls == [(["c"],)]

    asyncio.run(main())


def test_a_stream_that_finished_aborts_nothing() -> None:
    from coordinator.frontend import InferenceServicer
    from proto.kunserve.v1 import inference_pb2 as pb

    async def main() -> None:
        core, workers = make_coordinator()
        servicer = InferenceServicer(core, None, None)
        sampling = pb.SamplingParams(max_tokens=1)
        req = pb.GenerateRequest(
            request_id="f", token_ids=pb.TokenIds(ids=[1, 300]), sampling_params=sampling
        )
        stream = servicer.Generate(req, None)
        first = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0)
        core.on_step(step(0, 1, [RequestOutput("f", [300], FinishReason.LENGTH)]))
        responses = [await first] + [r async for r in stream]
        assert responses[-1].HasField("finished")
        assert workers[0].abort.calls == []

    asyncio.run(main())


def test_a_push_that_comes_after_another_workers_waits_for_it() -> None:
    """After a drop the leader's first push names the other members' last pushed steps
    (``StepResult.after``): it is applied only after them, so a moved request's tokens stay
    in order; a failed worker holds nothing back."""
    core, _ = make_coordinator()
    moved = core.submit("m", parsed(4))  # on instance 0, then moved to instance 1
    core.move_requests(["m"], core.instances[1])
    first = step(1, 1, [RequestOutput("m", [301])])
    first.after = {0: 1}
    core.on_step(first)
    core.on_step(step(1, 2, [RequestOutput("m", [302])]))
    assert drain(moved) == [] and core.applied_seq(1) == 0  # held, and what follows it
    core.on_step(step(0, 1, [RequestOutput("m", [300])]))  # worker 0's last push, late
    assert [e.token_ids for e in drain(moved)] == [[300], [301], [302]]
    assert core.applied_seq(1) == 2

    other = core.submit("o", parsed(4))
    core.move_requests(["o"], core.instances[1])
    held = step(1, 3, [RequestOutput("o", [303])])
    held.after = {0: 5}  # never pushed: worker 0 dies
    core.on_step(held)
    assert drain(other) == []
    core.fail_instance(core.instances[0], "worker 0 died")
    assert [e.token_ids for e in drain(other)] == [[303]]
