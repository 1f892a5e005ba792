"""Per-stage step time from a start-up profile, and what pipelining a group costs.

KunServe weighs a drop plan's freed memory against "cooperative execution overhead" with a cost
model built from hardware profiling (reference/kunserve.md §0 item 1, §3(b), §7: the paper's
formula was not available, so this model is ours). A worker profiles decode and prefill steps at
start-up for a few batch sizes and layer counts; this module interpolates between them and
prices a g-stage pipeline: g micro-batches in flight, each stage's compute plus its activation
send, the slowest stage setting the cycle.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from planner.config import PlannerConfig
from planner.types import ModelShape, PipelineEstimate

PHASES = ("decode", "prefill")


@dataclass(frozen=True)
class StepProfile:
    """Measured step times of one GPU with the model's layers ``[0, n)`` (embedding, n decoder
    layers, final norm and LM head), at a representative context length.

    A middle stage holds no embedding or head, so its time is slightly overestimated.
    """

    decode: Mapping[tuple[int, int], float]
    """Decode step seconds keyed by (num_layers, batch size in sequences)."""
    link_bandwidth_bytes_per_s: float
    """One-way point-to-point bandwidth between two members' GPUs (bytes/s)."""
    link_latency_s: float = 0.0
    """One small point-to-point message's latency (seconds)."""
    prefill: Mapping[tuple[int, int], float] = field(default_factory=dict)
    """Prefill step seconds keyed by (num_layers, tokens in the step)."""

    def __post_init__(self) -> None:
        if not self.decode:
            raise ValueError("StepProfile.decode needs at least one (num_layers, batch) point")
        for name in PHASES:
            for key, seconds in getattr(self, name).items():
                _check_point(name, key, seconds)
        if not (
            self.link_bandwidth_bytes_per_s > 0 and math.isfinite(self.link_bandwidth_bytes_per_s)
        ):
            raise ValueError(
                "StepProfile.link_bandwidth_bytes_per_s must be a finite number > 0, "
                f"got {self.link_bandwidth_bytes_per_s!r}"
            )
        if not (self.link_latency_s >= 0 and math.isfinite(self.link_latency_s)):
            raise ValueError(
                f"StepProfile.link_latency_s must be >= 0, got {self.link_latency_s!r}"
            )


def _check_point(phase: str, key: tuple[int, int], seconds: float) -> None:
    layers, batch = key
    if layers < 1 or batch < 1:
        raise ValueError(f"StepProfile.{phase} key {key}: num_layers and batch must be >= 1")
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ValueError(f"StepProfile.{phase}[{key}] must be a finite time > 0, got {seconds!r}")


class _Curve:
    """Piecewise-linear y(x) through measured points: flat below the first point, extended along
    the last segment above the last one but never below the last point (flat if there is one
    point), so a positive profile gives positive times."""

    def __init__(self, points: Sequence[tuple[int, float]]) -> None:
        pts = sorted(points)
        self.xs = [float(x) for x, _ in pts]
        self.ys = [y for _, y in pts]

    def at(self, x: float) -> float:
        xs, ys = self.xs, self.ys
        if x <= xs[0] or len(xs) == 1:
            return ys[0]
        if x > xs[-1]:
            return max(ys[-1], _line(xs[-2], ys[-2], xs[-1], ys[-1], x))
        i = bisect.bisect_left(xs, x)
        return _line(xs[i - 1], ys[i - 1], xs[i], ys[i], x)


def _line(x0: float, y0: float, x1: float, y1: float, x: float) -> float:
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


class _Table:
    """t(num_layers, batch): a batch curve per profiled layer count, linear between counts
    (time is affine in layers: each layer costs the same), extended along the nearest two counts
    outside them, proportional to layers if only one count was profiled. Outside the profiled
    counts the time is floored: below, by proportional scaling of the fewest layers; above, by
    the most layers' time."""

    def __init__(self, points: Mapping[tuple[int, int], float]) -> None:
        by_layers: dict[int, list[tuple[int, float]]] = {}
        for (layers, batch), seconds in points.items():
            by_layers.setdefault(layers, []).append((batch, seconds))
        self.layers = sorted(by_layers)
        self.curves = [_Curve(by_layers[n]) for n in self.layers]

    def at(self, num_layers: int, batch: float) -> float:
        ns = self.layers
        if len(ns) == 1:
            return self.curves[0].at(batch) * num_layers / ns[0]
        i = min(max(bisect.bisect_left(ns, num_layers), 1), len(ns) - 1)
        t0, t1 = self.curves[i - 1].at(batch), self.curves[i].at(batch)
        value = _line(ns[i - 1], t0, ns[i], t1, num_layers)
        if num_layers < ns[0]:
            return max(value, t0 * num_layers / ns[0])
        return max(value, t1) if num_layers > ns[-1] else value


class CostModel:
    """Step times of full instances and of pipeline stages, from one ``StepProfile``."""

    def __init__(self, profile: StepProfile, shape: ModelShape) -> None:
        self.profile = profile
        self.shape = shape
        self._tables = {"decode": _Table(profile.decode)}
        if profile.prefill:
            self._tables["prefill"] = _Table(profile.prefill)

    def step_time(self, phase: str, batch: int, num_layers: int) -> float:
        """Seconds of one step of ``batch`` sequences (decode) or tokens (prefill) over
        ``num_layers`` layers. Raises ValueError for an unknown or unprofiled phase."""
        if phase not in self._tables:
            raise ValueError(f"phase {phase!r} has no profile; profiled: {sorted(self._tables)}")
        return self._tables[phase].at(num_layers, max(1, batch))

    def send_time(self, num_tokens: int) -> float:
        """Seconds to send ``num_tokens`` tokens' activations across one stage boundary."""
        nbytes = num_tokens * self.shape.hidden_bytes_per_token
        return self.profile.link_latency_s + nbytes / self.profile.link_bandwidth_bytes_per_s

    def refill_time(self, nbytes: int) -> float:
        """Seconds to copy ``nbytes`` of weights from a peer over the link (restore)."""
        return self.profile.link_latency_s + nbytes / self.profile.link_bandwidth_bytes_per_s

    def pipeline_cycle(
        self, phase: str, batch: int, stage_layers: Sequence[int]
    ) -> tuple[float, float]:
        """(cycle seconds, bubble fraction) of ``batch`` split into g = len(stage_layers)
        micro-batches, one in flight per stage.

        Stage r takes its compute for ceil(batch/g) plus its send to stage r+1 (the last stage
        returns sampled token ids: one latency). Every micro-batch passes every stage once per
        cycle, so the cycle is g times the slowest stage; the bubble is the idle share.
        """
        g = len(stage_layers)
        micro = -(-max(1, batch) // g)
        stage = [self.step_time(phase, micro, n) for n in stage_layers]
        stage = [t + self.send_time(micro) for t in stage[:-1]] + [
            stage[-1] + self.profile.link_latency_s
        ]
        slowest = max(stage)
        return g * slowest, 1.0 - sum(stage) / (g * slowest)

    def estimate(
        self, running: Sequence[int], admitted: int, stage_layers: Sequence[int]
    ) -> PipelineEstimate:
        """Decode before and after a drop. ``running``: each member's running batch now
        (sequences); ``admitted``: queued sequences the pipeline admits on top of them."""
        batch_after = sum(running) + admitted
        full = self.shape.num_layers
        before = [(b, self.step_time("decode", b, full)) for b in running if b > 0]
        g = len(stage_layers)
        cycle, bubble = self.pipeline_cycle("decode", batch_after, stage_layers)
        return PipelineEstimate(
            tbt_before_s=max((t for _, t in before), default=self.step_time("decode", 1, full)),
            tbt_unpipelined_s=self.step_time("decode", -(-max(1, batch_after) // g), full),
            tbt_after_s=cycle,
            throughput_before=sum(b / t for b, t in before),
            throughput_after=max(1, batch_after) / cycle,
            bubble_fraction=bubble,
            admitted=admitted,
        )


def rejection(estimate: PipelineEstimate, config: PlannerConfig) -> str | None:
    """Why a plan's pipeline costs more than it gives, or None when it pays off.

    Rejected when it admits no queued sequence (no benefit), when its time between tokens
    exceeds ``max_tbt_slowdown`` times the unpipelined time, or when its decode tokens/s falls
    below ``min_throughput_ratio`` times the members' tokens/s now.
    """
    if estimate.admitted < 1:
        return "admits no queued request"
    limit = config.max_tbt_slowdown * estimate.tbt_unpipelined_s
    if estimate.tbt_after_s > limit:
        return f"TBT {estimate.tbt_after_s * 1e3:.2f} ms exceeds {limit * 1e3:.2f} ms"
    floor = config.min_throughput_ratio * estimate.throughput_before
    if estimate.throughput_after < floor:
        return f"throughput {estimate.throughput_after:.0f} tok/s is below {floor:.0f} tok/s"
    return None
