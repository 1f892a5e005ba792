"""Stall diagnostics: warnings that name where a long pause in serving went.

A server that stops producing tokens for a second shows up in a replay only as a hole in its
timeline. These log, at warning level and only when something is slow, what the process was
doing: an engine step and its phases (:class:`PhaseClock`, the worker loop's report), a
garbage-collector pass (:func:`install_gc_monitor`), an event loop that did not run its
callbacks on time (:func:`watch_event_loop`). The thresholds are far above a healthy step
(milliseconds), so in normal serving nothing is logged and the cost is a few clock reads.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

logger = logging.getLogger(__name__)

SLOW_STEP_S = 0.5
"""An engine iteration (step and push) longer than this is reported with its phases."""
SLOW_GC_S = 0.05
"""A garbage-collector pass longer than this is reported."""
LOOP_LAG_S = 0.25
"""An event loop running its callbacks this late is reported."""


class PhaseClock:
    """Wall time of named phases (seconds, ``time.perf_counter``): of one engine iteration,
    or of one transition.

    ``with clock.phase("launch"): ...`` adds that block's time to its phase; ``mark(name)``
    adds the time since the previous mark (or the start) to ``name``. Phases repeat (a
    pipelined iteration may launch and collect) and add up; :meth:`reset` starts over.
    ``sync``, when given, is called before each mark reads the clock (a device sync, so a
    phase owns the GPU work it queued).
    """

    def __init__(self, sync: Callable[[], None] | None = None) -> None:
        self._sync = sync
        self.phases: dict[str, float] = {}
        self._last = self._now()

    def _now(self) -> float:
        if self._sync is not None:
            self._sync()
        return time.perf_counter()

    def reset(self) -> None:
        self.phases = {}
        self._last = self._now()

    def _add(self, name: str, seconds: float) -> None:
        self.phases[name] = self.phases.get(name, 0.0) + seconds

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self._add(name, time.perf_counter() - start)

    def mark(self, name: str) -> None:
        now = self._now()
        self._add(name, now - self._last)
        self._last = now

    def describe(self) -> str:
        """``"schedule 1.2 ms, launch 3.4 ms"``, in the order the phases first ran."""
        return ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in self.phases.items()) or "no phases"

    __str__ = describe


class PhaseTotals:
    """Phases summed over many phase clocks (one per pipelined step), for the mean
    step a pipeline logs when it stops: where the host time of its steady state went."""

    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self.count = 0

    def add(self, clock: PhaseClock) -> None:
        for name, seconds in clock.phases.items():
            self.phases[name] = self.phases.get(name, 0.0) + seconds
        self.count += 1

    def describe_mean(self) -> str:
        """``"plan 0.12 ms, inputs 0.50 ms"``: each phase's mean per clock added."""
        if not self.count:
            return "no steps"
        n = self.count
        return ", ".join(f"{k} {1e3 * v / n:.2f} ms" for k, v in self.phases.items())


class _HostEvent:
    """``torch.cuda.Event``'s timing calls on the host: a CPU device has run what it was given
    by the time the call returns, so a host clock marks it."""

    def __init__(self) -> None:
        self.t = 0.0

    def record(self) -> None:
        self.t = time.perf_counter()

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end: _HostEvent) -> float:
        return 1e3 * (end.t - self.t)


class ComputeTimeline:
    """When a pipeline stage's device computes its micro-batches, and how long it idles
    between them (events on the stream, read once the device has passed them).

    The stage calls :meth:`begin` right before a micro-batch's layers (on a later stage,
    after its activations' receive was queued, so the idle time holds the wait for them) and
    :meth:`end` right after. Per kind of micro-batch (``"prompt"``: it carries a prompt
    chunk; ``"decode"``: decodes only) it sums the compute time and the idle time before it,
    where that is at most ``idle_cap_s`` (longer: nothing was queued, not a pipeline bubble).
    :meth:`mark` splits the idle time: the part up to a mark is that mark's (the leader
    marks when the last stage's logits arrived and when it sampled them, a later stage when
    its activations arrived), the part after the last mark is ``"launch"`` (the device ran
    the micro-batch's small input copies, or waited for the host to queue it). With
    ``trace`` it also keeps one row per micro-batch (:meth:`rows`). On a CPU device the
    events are host clock reads.
    """

    def __init__(self, device: torch.device, idle_cap_s: float = 0.05, trace: bool = False) -> None:
        self._cuda = device.type == "cuda"
        self.idle_cap_ms = 1e3 * idle_cap_s
        self._pending: deque[tuple[list[tuple[str, Any]], Any, Any, str, dict]] = deque()
        self._marks: list[tuple[str, Any]] = []
        self._last_end: Any = None
        self.sums: dict[str, list[float]] = {}
        """kind -> [micro-batches, compute ms, idle ms counted, idle gaps counted]."""
        self.parts: dict[str, dict[str, float]] = {}
        """kind -> idle part -> ms, summed over the idle gaps counted."""
        self._trace: list[dict[str, Any]] | None = [] if trace else None

    @property
    def traces(self) -> bool:
        """Whether it keeps trace rows (``trace``): the figures given to :meth:`end` are
        read only then."""
        return self._trace is not None

    def _event(self) -> Any:
        return torch.cuda.Event(enable_timing=True) if self._cuda else _HostEvent()

    def mark(self, name: str) -> None:
        """Marks a point in the idle time before the next micro-batch: the idle time since
        the previous mark (or the last micro-batch's end) is ``name``'s."""
        event = self._event()
        event.record()
        self._marks.append((name, event))

    def begin(self) -> Any:
        """Marks the start of a micro-batch's compute; pass the result to :meth:`end`."""
        event = self._event()
        event.record()
        return event

    def end(self, begin: Any, kind: str, **figures: int) -> None:
        """Marks the end of the micro-batch begun at ``begin``; ``figures`` (e.g. its
        ``tokens``) go into its trace row."""
        event = self._event()
        event.record()
        self._pending.append((self._marks, begin, event, kind, figures))
        self._marks = []
        self._read(wait=False)

    def _read(self, wait: bool) -> None:
        while self._pending:
            marks, begin, end, kind, figures = self._pending[0]
            if wait:
                end.synchronize()
            elif not end.query():
                return
            self._pending.popleft()
            s = self.sums.setdefault(kind, [0, 0.0, 0.0, 0])
            compute = begin.elapsed_time(end)
            s[0] += 1
            s[1] += compute
            idle, split = None, {}
            if self._last_end is not None:
                idle = self._last_end.elapsed_time(begin)
                at = self._last_end
                for name, event in [*marks, ("launch", begin)]:
                    split[name] = split.get(name, 0.0) + at.elapsed_time(event)
                    at = event
                if idle <= self.idle_cap_ms:
                    s[2] += idle
                    s[3] += 1
                    parts = self.parts.setdefault(kind, {})
                    for name, ms in split.items():
                        parts[name] = parts.get(name, 0.0) + ms
            if self._trace is not None:
                self._trace.append(
                    {
                        "kind": kind,
                        **figures,
                        "compute_ms": compute,
                        "idle_ms": idle,
                        "idle_parts_ms": split,
                    }
                )
            self._last_end = end

    def rows(self) -> list[dict[str, Any]]:
        """With ``trace``: one row per micro-batch read so far, in order: ``kind``, the
        figures given to :meth:`end`, ``compute_ms``, ``idle_ms`` before it (None for the
        first, uncapped) and ``idle_parts_ms`` (the idle time by mark). Waits for the
        device."""
        self._read(wait=True)
        return list(self._trace or [])

    def describe(self) -> str:
        """``"412 prompt micro-batches: compute 12.10 ms, idle before 3.02 ms (logits 1.80,
        sample 0.20, launch 1.02; busy 0.80)"`` per kind: the means, the idle time by part
        (with marks only), and compute / (compute + idle). Waits for the device to pass
        every marked micro-batch."""
        self._read(wait=True)
        parts = []
        for kind, (n, busy, idle, gaps) in self.sums.items():
            mean_idle = idle / gaps if gaps else 0.0
            mean_busy = busy / n
            share = mean_busy / (mean_busy + mean_idle) if mean_busy + mean_idle else 0.0
            split = self.parts.get(kind, {})
            by_part = ""
            if gaps and set(split) != {"launch"}:
                by_part = ", ".join(f"{k} {v / gaps:.2f}" for k, v in split.items()) + "; "
            parts.append(
                f"{int(n)} {kind} micro-batches: compute {mean_busy:.2f} ms, idle before "
                f"{mean_idle:.2f} ms ({by_part}busy {share:.2f})"
            )
        return "; ".join(parts) or "no micro-batches"


class LateLog:
    """Warns of late events at most once per ``every_s`` per key, counting the rest: a stall
    delays every event behind it, and one line per event would flood the log."""

    def __init__(self, what: str, threshold_s: float = LOOP_LAG_S, every_s: float = 1.0) -> None:
        self.what = what
        self.threshold_s = threshold_s
        self.every_s = every_s
        self._last: dict[Any, float] = {}
        self._held: dict[Any, tuple[int, float]] = {}

    def observe(self, key: Any, late_s: float) -> bool:
        """Records one event ``late_s`` seconds late; returns whether it logged a warning."""
        if late_s <= self.threshold_s:
            return False
        n, worst = self._held.get(key, (0, 0.0))
        n, worst = n + 1, max(worst, late_s)
        now = time.monotonic()
        if now - self._last.get(key, -1e9) < self.every_s:
            self._held[key] = (n, worst)
            return False
        self._last[key] = now
        self._held.pop(key, None)
        logger.warning("%s %s: %d late, the worst by %.0f ms", self.what, key, n, 1e3 * worst)
        return True


def allocator_retries(device: torch.device) -> int:
    """cudaMalloc retries of the caching allocator on ``device`` so far: each one freed every
    cached block and synchronized the device (0 off CUDA)."""
    if device.type != "cuda":
        return 0
    return int(torch.cuda.memory_stats(device).get("num_alloc_retries", 0))


_gc_started: dict[str, float] = {}


@dataclass
class GcTotals:
    """Garbage-collector passes in this process since :func:`install_gc_monitor`, by
    generation (0, 1, 2): how many and their seconds. Every pass stops every thread, so on a
    pipeline stage each one is host time its device may idle through."""

    passes: list[int] = field(default_factory=lambda: [0, 0, 0])
    seconds: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])

    def since(self, before: GcTotals) -> GcTotals:
        """The passes after ``before`` (a :meth:`copy` taken earlier)."""
        return GcTotals(
            [a - b for a, b in zip(self.passes, before.passes, strict=True)],
            [a - b for a, b in zip(self.seconds, before.seconds, strict=True)],
        )

    def copy(self) -> GcTotals:
        return GcTotals(list(self.passes), list(self.seconds))

    def describe(self) -> str:
        """E.g. ``"12 passes, 3.1 ms (gen0 10 in 1.0 ms, gen1 2 in 2.1 ms, gen2 0 in 0.0 ms)"``."""
        by_gen = ", ".join(
            f"gen{g} {n} in {1e3 * t:.1f} ms"
            for g, (n, t) in enumerate(zip(self.passes, self.seconds, strict=True))
        )
        return f"{sum(self.passes)} passes, {1e3 * sum(self.seconds):.1f} ms ({by_gen})"


GC_TOTALS = GcTotals()
"""This process's collector passes (:class:`GcTotals`), counted by :func:`install_gc_monitor`."""


def _on_gc(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        _gc_started["t"] = time.perf_counter()
        return
    started = _gc_started.pop("t", None)
    if started is None:
        return
    took = time.perf_counter() - started
    gen = min(max(int(info.get("generation", 2)), 0), 2)
    GC_TOTALS.passes[gen] += 1
    GC_TOTALS.seconds[gen] += took
    if took > SLOW_GC_S:
        logger.warning(
            "garbage collection of generation %d took %.0f ms (%d objects collected)",
            info.get("generation", -1),
            1e3 * took,
            info.get("collected", 0),
        )


def install_gc_monitor() -> None:
    """Reports every garbage-collector pass longer than ``SLOW_GC_S`` in this process, and
    counts every pass in ``GC_TOTALS`` (idempotent)."""
    if _on_gc not in gc.callbacks:
        gc.callbacks.append(_on_gc)


def freeze_startup_heap() -> int:
    """Collects once, then moves every object alive now (modules, the model, start-up state)
    to the collector's permanent generation, so later full passes scan only what serving
    allocates: an unfrozen full pass over a worker's start-up heap takes about 0.1 s of
    every thread's time (vLLM does the same after start-up). Returns the objects frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


async def watch_event_loop(interval_s: float = 0.1, name: str = "event loop") -> None:
    """Runs forever on the loop it watches: sleeps ``interval_s`` and reports when it wakes
    more than ``LOOP_LAG_S`` late (a callback held the loop: every RPC and stream waited)."""
    while True:
        start = time.perf_counter()
        await asyncio.sleep(interval_s)
        late = time.perf_counter() - start - interval_s
        if late > LOOP_LAG_S:
            logger.warning("%s ran its callbacks %.0f ms late", name, 1e3 * late)
