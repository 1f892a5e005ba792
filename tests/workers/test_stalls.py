"""Stall diagnostics (workers/stalls.py): each warning fires on a real stall and not on a
healthy run."""

from __future__ import annotations

import asyncio
import gc
import logging
import time

import pytest
import torch

from workers import stalls


def test_phase_clock_adds_repeated_phases_in_first_run_order():
    clock = stalls.PhaseClock()
    with clock.phase("launch"):
        time.sleep(0.01)
    with clock.phase("collect"):
        pass
    with clock.phase("launch"):
        time.sleep(0.01)
    assert list(clock.phases) == ["launch", "collect"]
    assert clock.phases["launch"] >= 0.02
    assert clock.describe().startswith("launch ")
    clock.reset()
    assert clock.describe() == "no phases"


def test_phase_clock_counts_a_phase_that_raises():
    clock = stalls.PhaseClock()
    with pytest.raises(ValueError), clock.phase("step"):
        raise ValueError("engine fault")
    assert "step" in clock.phases


def test_phase_totals_give_each_phases_mean_per_clock():
    totals = stalls.PhaseTotals()
    assert totals.describe_mean() == "no steps"
    for launch, wait in ((0.002, 0.010), (0.004, 0.0)):
        clock = stalls.PhaseClock()
        clock.phases = {"launch": launch, "later stages": wait}
        totals.add(clock)
    assert totals.count == 2
    assert totals.describe_mean() == "launch 3.00 ms, later stages 5.00 ms"


def test_compute_timeline_sums_compute_and_the_idle_before_each_micro_batch_by_kind(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(stalls.time, "perf_counter", lambda: now[0])
    timeline = stalls.ComputeTimeline(torch.device("cpu"), idle_cap_s=0.05)
    assert timeline.describe() == "no micro-batches"
    # (idle before, compute, kind) in ms: the first has no gap before it, the 0.2 s gap is
    # an idle server (over the cap), not a bubble.
    for idle, busy, kind in ((0, 10, "prompt"), (2, 12, "prompt"), (200, 4, "decode"),
                             (6, 4, "decode"), (4, 8, "prompt")):  # fmt: skip
        now[0] += idle / 1e3
        begin = timeline.begin()
        now[0] += busy / 1e3
        timeline.end(begin, kind)
    assert timeline.sums["prompt"] == pytest.approx([3, 30.0, 6.0, 2])
    assert timeline.sums["decode"] == pytest.approx([2, 8.0, 6.0, 1])
    assert timeline.describe() == (
        "3 prompt micro-batches: compute 10.00 ms, idle before 3.00 ms (busy 0.77); "
        "2 decode micro-batches: compute 4.00 ms, idle before 6.00 ms (busy 0.40)"
    )


def test_compute_timeline_splits_the_idle_time_at_its_marks_and_traces_each_micro_batch(
    monkeypatch,
):
    now = [0.0]
    monkeypatch.setattr(stalls.time, "perf_counter", lambda: now[0])
    timeline = stalls.ComputeTimeline(torch.device("cpu"), idle_cap_s=0.05, trace=True)

    def micro_batch(marks, busy_ms, kind, tokens):
        for name, ms in marks:  # the idle time up to each mark, then up to the begin
            now[0] += ms / 1e3
            if name != "launch":
                timeline.mark(name)
        begin = timeline.begin()
        now[0] += busy_ms / 1e3
        timeline.end(begin, kind, tokens=tokens)

    micro_batch([("logits", 5)], 10, "prompt", 1024)  # the first: no idle before it
    micro_batch([("logits", 1.5), ("sample", 0.5), ("launch", 1)], 12, "prompt", 1024)
    micro_batch([("logits", 3.5), ("sample", 0.5), ("launch", 0)], 8, "prompt", 600)
    micro_batch([("launch", 2)], 2, "decode", 40)  # no marks: all of it is the launch's
    assert timeline.parts["prompt"] == pytest.approx({"logits": 5.0, "sample": 1.0, "launch": 1.0})
    assert timeline.parts["decode"] == pytest.approx({"launch": 2.0})
    assert timeline.describe() == (
        "3 prompt micro-batches: compute 10.00 ms, idle before 3.50 ms (logits 2.50, "
        "sample 0.50, launch 0.50; busy 0.74); "
        "1 decode micro-batches: compute 2.00 ms, idle before 2.00 ms (busy 0.50)"
    )
    rows = timeline.rows()
    assert [(r["kind"], r["tokens"]) for r in rows] == [
        ("prompt", 1024), ("prompt", 1024), ("prompt", 600), ("decode", 40)
    ]  # fmt: skip
    assert rows[0]["idle_ms"] is None and rows[0]["compute_ms"] == pytest.approx(10.0)
    assert rows[2]["idle_ms"] == pytest.approx(4.0)
    assert rows[2]["idle_parts_ms"] == pytest.approx({"logits": 3.5, "sample": 0.5, "launch": 0.0})
    assert timeline.traces
    untraced = stalls.ComputeTimeline(torch.device("cpu"))
    assert not untraced.traces and untraced.rows() == []  # no trace kept


def test_gc_monitor_reports_only_slow_passes(caplog, monkeypatch):
    installed = stalls._on_gc in gc.callbacks
    try:
        stalls.install_gc_monitor()
        stalls.install_gc_monitor()
        assert gc.callbacks.count(stalls._on_gc) == 1
        with caplog.at_level(logging.WARNING, logger="workers.stalls"):
            gc.collect(0)  # a young-generation pass: well under SLOW_GC_S
            assert not caplog.records
            monkeypatch.setattr(stalls, "SLOW_GC_S", 0.0)
            gc.collect(0)
    finally:
        if not installed:
            gc.callbacks.remove(stalls._on_gc)
    assert any("garbage collection of generation 0" in r.message for r in caplog.records)


def test_event_loop_watch_reports_a_blocked_loop(caplog):
    async def main():
        task = asyncio.ensure_future(stalls.watch_event_loop(interval_s=0.02, name="test loop"))
        await asyncio.sleep(0.1)  # healthy: nothing reported
        assert not caplog.records
        await asyncio.sleep(0.03)
        time.sleep(0.4)  # a callback holds the loop past LOOP_LAG_S
        await asyncio.sleep(0.05)
        task.cancel()

    with caplog.at_level(logging.WARNING, logger="workers.stalls"):
        asyncio.run(main())
    assert any("test loop ran its callbacks" in r.message for r in caplog.records)


def test_allocator_retries_is_zero_off_cuda():
    import torch

    assert stalls.allocator_retries(torch.device("cpu")) == 0


def test_freeze_startup_heap_takes_live_objects_out_of_full_passes():
    try:
        frozen = stalls.freeze_startup_heap()
        # A frozen object that dies afterwards (another thread drops its last reference)
        # leaves the count: on a fresh-clone CI run 2 of 540,730 did between the two reads.
        assert 0 < gc.get_freeze_count() <= frozen
    finally:
        gc.unfreeze()
    assert gc.get_freeze_count() == 0


def test_late_log_warns_once_per_period_and_counts_the_rest(caplog, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(stalls.time, "monotonic", lambda: clock[0])
    log = stalls.LateLog("pushes late from", threshold_s=0.25, every_s=1.0)
    with caplog.at_level(logging.WARNING, logger="workers.stalls"):
        assert not log.observe("worker 0", 0.2)  # under the threshold
        assert log.observe("worker 0", 0.5)
        assert not log.observe("worker 0", 0.9)  # held: same second
        assert log.observe("worker 1", 0.3)  # another key has its own period
        clock[0] += 1.5
        assert log.observe("worker 0", 0.4)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "pushes late from worker 0: 1 late, the worst by 500 ms",
        "pushes late from worker 1: 1 late, the worst by 300 ms",
        "pushes late from worker 0: 2 late, the worst by 900 ms",
    ]


def test_worker_reports_a_slow_iteration_with_its_phases(stories_dir, caplog):
    """The worker's warning names the iteration's phases and the engine's last step."""
    import torch

    from tests.workers.pipeline_helpers import engine_config, spec_of
    from workers.engine import Engine
    from workers.worker import Worker

    installed, threads = stalls._on_gc in gc.callbacks, torch.get_num_threads()
    worker = Worker(0, engine_config(stories_dir), coordinator=None, use_gpu=False)
    # the worker sets these up for its own process; not for the test session's
    torch.set_num_threads(threads)
    if not installed:
        gc.callbacks.remove(stalls._on_gc)
    worker.engine = Engine(worker.config, torch.device("cpu"))
    worker.engine.add_request(spec_of("a1"))
    worker.engine.clock.reset()
    worker.engine.step()
    with caplog.at_level(logging.WARNING, logger="workers.worker"):
        worker._report_slow(0.75)
    (line,) = [r.getMessage() for r in caplog.records]
    assert line.startswith("worker 0: engine iteration took 750 ms (schedule ")
    assert "execute " in line and "update " in line
    assert "1 running, 0 waiting, 0 in flight, 0 allocator retries so far" in line


def test_phase_clock_marks_time_between_marks_after_a_sync():
    """A transition's phases: each mark takes the time since the last, after ``sync``."""
    synced = []
    clock = stalls.PhaseClock(sync=lambda: synced.append(time.perf_counter()))
    time.sleep(0.01)
    clock.mark("weights out")
    clock.mark("KV views")
    time.sleep(0.01)
    clock.mark("weights out")  # a repeated phase adds up
    assert list(clock.phases) == ["weights out", "KV views"]
    assert clock.phases["weights out"] >= 0.02 and clock.phases["KV views"] < 0.01
    assert len(synced) == 4  # at the start and before each mark
    assert str(clock) == clock.describe() and str(clock).startswith("weights out ")


def test_gc_totals_count_every_pass_by_generation():
    """Each pass lands in its generation's count and seconds; ``since`` is the window after
    a copy, and ``describe`` names every generation."""
    installed = stalls._on_gc in gc.callbacks
    try:
        stalls.install_gc_monitor()
        before = stalls.GC_TOTALS.copy()
        gc.collect(0)
        gc.collect(0)
        gc.collect(1)
        window = stalls.GC_TOTALS.since(before)
    finally:
        if not installed:
            gc.callbacks.remove(stalls._on_gc)
    assert window.passes[0] >= 2 and window.passes[1] >= 1  # automatic passes may add to these
    assert all(t >= 0 for t in window.seconds) and sum(window.seconds) > 0
    text = window.describe()
    assert text.startswith(f"{sum(window.passes)} passes, ") and "gen2 " in text
    assert stalls.GcTotals([3, 1, 0], [0.001, 0.002, 0.0]).describe() == (
        "4 passes, 3.0 ms (gen0 3 in 1.0 ms, gen1 1 in 2.0 ms, gen2 0 in 0.0 ms)"
    )
