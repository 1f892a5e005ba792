"""Where a captured decode step's GPU time goes, kernel by kernel (``bench engine --profile``).

:func:`profile_decode_graph` replays one captured decode graph under ``torch.profiler`` (CUDA
activity), with a host sync and a short sleep after each replay, so that each replay's kernels
form one burst on the GPU timeline that :func:`split_replays` cuts at the idle gaps. The rest
of the module is pure functions over the profiler's device events, testable on CPU:

- :func:`build_profile` aggregates the kernels by full name into count, µs per step and share
  of the step, and adds up the step's three lengths: the kernels' sum, the graph's *span*
  (first kernel start to last kernel end, so ``span - sum`` is the idle time between kernels
  inside the graph) and the back-to-back replay time measured without the profiler (CUDA
  events), so ``replay - span`` is what launching the graph costs between two replays.
- :func:`attribute_gemms` names each GEMM by its place in the step (per layer: q/k/v, o,
  gate/up, down, then the LM head) and gives the bytes it moves per µs, to compare with the
  copy bandwidth: at batch 1 a GEMM is a weight read and should run near it.

CUPTI traces every kernel of a graph replay individually; its tracing may lengthen short
kernels by a little, which is why the step time the table's percentages use is the replay
time measured outside the profiler.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

GEMM_PATTERN = re.compile(r"gemm|gemv|nvjet|xmma|cutlass|cublas|splitkreduce", re.IGNORECASE)
"""Kernel names of cuBLAS / cuBLASLt matmuls (and their split-K reductions) on recent GPUs."""
WHOLE_GEMM_PATTERN = re.compile(r"skinny_gemm")
"""GEMM kernels that are a whole matmul in one launch (kernels/skinny_gemm.py): with the norm
or activation before them fused in, they follow each other, yet each is a matmul of its own."""
REPLAY_GAP_S = 2e-3
"""Host sleep after each profiled replay's sync: the idle gap :func:`split_replays` cuts at."""
TABLE_ROWS = 24
"""Kernels listed one by one; the rest are summed into one row."""


@dataclass(frozen=True)
class KernelEvent:
    """One kernel (or memcpy / memset) execution on the GPU timeline, in µs."""

    name: str  # full (demangled) name, as the profiler reports it
    start_us: float
    end_us: float

    @property
    def dur_us(self) -> float:
        return self.end_us - self.start_us


@dataclass(frozen=True)
class KernelRow:
    """One kernel name's share of a step, averaged over the profiled replays."""

    name: str  # full name
    count: float  # launches per step
    us: float  # µs per step, summed over its launches

    @property
    def short_name(self) -> str:
        return short_kernel_name(self.name)


@dataclass(frozen=True)
class Projection:
    """One matmul of the decode step: ``rows x in_features`` times its weight, once per
    ``layers`` (every decoder layer, or 1 for the LM head)."""

    name: str
    in_features: int
    out_features: int
    layers: int

    def bytes_moved(self, rows: int, elem_bytes: int) -> int:
        """Bytes one step reads and writes for it, over all its layers: the weight, the input
        rows and the output rows (``rows``: the graph's padded batch)."""
        weight = self.in_features * self.out_features
        return self.layers * (weight + rows * (self.in_features + self.out_features)) * elem_bytes


@dataclass(frozen=True)
class GemmRow:
    """One projection's GEMM kernels (split-K reductions included) per step."""

    name: str
    kernels: float  # per step
    us: float  # per step
    bytes: int  # per step (Projection.bytes_moved)

    @property
    def bytes_per_s(self) -> float:
        return self.bytes / (self.us * 1e-6) if self.us else float("nan")


@dataclass
class StepProfile:
    """One decode graph's kernels per step, averaged over ``replays`` profiled replays."""

    batch: int  # requests decoding
    context: int  # prompt tokens per request
    graph_size: int  # the captured size replayed (batch padded up)
    replays: int
    rows: list[KernelRow]  # by µs per step, largest first
    kernel_us: float  # sum of every kernel's time per step
    span_us: float  # mean first-kernel start to last-kernel end of one replay
    replay_us: float | None = None  # back-to-back replay time without the profiler (CUDA events)
    gemms: list[GemmRow] | None = field(default=None)  # None when the GEMMs could not be named

    @property
    def idle_us(self) -> float:
        """GPU idle time between kernels inside one replay (span minus the kernels' sum)."""
        return self.span_us - self.kernel_us

    @property
    def step_us(self) -> float:
        """The step time percentages refer to: the back-to-back replay time if measured,
        else the span."""
        return self.replay_us if self.replay_us is not None else self.span_us


def device_events(events: Iterable[object]) -> list[KernelEvent]:
    """The GPU-side events of ``torch.profiler.profile(...).events()`` (``FunctionEvent``\\ s
    whose ``device_type`` is CUDA: kernels, memcpys, memsets), sorted by start time."""
    cuda = torch.autograd.DeviceType.CUDA
    out = [
        KernelEvent(e.name, float(e.time_range.start), float(e.time_range.end))
        for e in events
        if e.device_type == cuda
    ]
    return sorted(out, key=lambda k: k.start_us)


def split_replays(events: Sequence[KernelEvent], min_gap_us: float) -> list[list[KernelEvent]]:
    """Cuts time-sorted ``events`` into bursts wherever the GPU idles for at least
    ``min_gap_us`` between one event's end and the next one's start. Returns [] for no events."""
    groups: list[list[KernelEvent]] = []
    last_end = float("-inf")
    for e in events:
        if e.start_us - last_end >= min_gap_us or not groups:
            groups.append([])
        groups[-1].append(e)
        last_end = max(last_end, e.end_us)
    return groups


def build_profile(
    replays: Sequence[Sequence[KernelEvent]],
    batch: int,
    context: int,
    graph_size: int,
    replay_us: float | None = None,
    gemms: list[GemmRow] | None = None,
) -> StepProfile:
    """Aggregates the kernels of ``replays`` (each one replay's events, from
    :func:`split_replays`) into per-step rows. Raises ValueError when ``replays`` is empty."""
    if not replays:
        raise ValueError("no replays to aggregate: the profiler recorded no GPU events")
    n = len(replays)
    count: dict[str, int] = {}
    total: dict[str, float] = {}
    for group in replays:
        for e in group:
            count[e.name] = count.get(e.name, 0) + 1
            total[e.name] = total.get(e.name, 0.0) + e.dur_us
    rows = [KernelRow(name, count[name] / n, total[name] / n) for name in total]
    rows.sort(key=lambda r: (-r.us, r.name))
    span = sum(max(e.end_us for e in g) - min(e.start_us for e in g) for g in replays) / n
    kernel_us = sum(total.values()) / n
    return StepProfile(batch, context, graph_size, n, rows, kernel_us, span, replay_us, gemms)


def attribute_gemms(
    replays: Sequence[Sequence[KernelEvent]],
    per_layer: Sequence[Projection],
    head: Projection | None,
    rows: int,
    elem_bytes: int,
) -> list[GemmRow] | None:
    """Names every GEMM of each replay by its place in the step and sums them per projection.

    A replay's GEMM kernels (names matching :data:`GEMM_PATTERN`) that follow each other with
    no other kernel between form one matmul (a main kernel and its split-K reduction), except
    those matching :data:`WHOLE_GEMM_PATTERN`, each a matmul of its own; the step runs
    ``per_layer`` in order once per layer, then ``head``. Returns None when a replay
    holds another number of matmuls than ``layers * len(per_layer) + (head is not None)``.
    """
    if not replays or not per_layer:
        return None
    layers = per_layer[0].layers
    order = [p.name for p in per_layer] * layers + ([head.name] if head else [])
    kernels: dict[str, int] = {}
    us: dict[str, float] = {}
    for group in replays:
        matmuls = _consecutive_gemms(group)
        if len(matmuls) != len(order):
            return None
        for name, matmul in zip(order, matmuls, strict=True):
            kernels[name] = kernels.get(name, 0) + len(matmul)
            us[name] = us.get(name, 0.0) + sum(e.dur_us for e in matmul)
    n = len(replays)
    projections = [*per_layer, *([head] if head else [])]
    return [
        GemmRow(p.name, kernels[p.name] / n, us[p.name] / n, p.bytes_moved(rows, elem_bytes))
        for p in projections
    ]


def _consecutive_gemms(group: Sequence[KernelEvent]) -> list[list[KernelEvent]]:
    out: list[list[KernelEvent]] = []
    previous_joins = False  # the previous kernel was a GEMM that the next one may continue
    for e in group:
        is_gemm = GEMM_PATTERN.search(e.name) is not None
        whole = WHOLE_GEMM_PATTERN.search(e.name) is not None
        if is_gemm and previous_joins and not whole:
            out[-1].append(e)
        elif is_gemm:
            out.append([e])
        previous_joins = is_gemm and not whole
    return out


_FUNCTOR = re.compile(r"[A-Za-z_]\w*?(?:Functor|Ops?)(?:_\w+)?\b")


def short_kernel_name(name: str, width: int = 56) -> str:
    """A kernel name a table can show: no ``void``, no parameter list, no namespaces; a
    template's arguments shrink to the last functor or op they name (``FillFunctor``,
    ``ArgMaxOps``) or to ``<…>``; cut to ``width`` characters."""
    s = name.removeprefix("void ").strip()
    depth = 0
    for i, ch in enumerate(s):  # the parameter list: the first "(" outside template brackets
        depth += {"<": 1, ">": -1}.get(ch, 0)
        if ch == "(" and depth == 0 and i > 0 and s[i - 1] != " ":
            s = s[:i]
            break
    lt = s.find("<")
    if lt > 0:
        functors = _FUNCTOR.findall(s[lt:])
        s = s[:lt] + (f"<{functors[-1]}>" if functors else "<…>")
    s = s.rsplit("::", 1)[-1] if "::" in s.split("<", 1)[0] else s
    return s if len(s) <= width else s[: width - 1] + "…"


def format_profile(p: StepProfile, bandwidth: float) -> str:
    """The table ``bench engine --profile`` prints for one point (``bandwidth``: the copy
    bandwidth in bytes/s measured in the same run, 0 when unknown)."""

    def line(label: str, count: float | None, us: float) -> str:
        n = _count(count) if count is not None else ""
        share = f"{100 * us / p.step_us:>7.1f}" if p.step_us else f"{'-':>7}"
        return f"{label:<56} {n:>7} {us:>9.1f} {share}"

    lines = [
        f"decode graph kernels: batch {p.batch}, ctx {p.context}, graph size {p.graph_size}, "
        f"mean of {p.replays} replays under torch.profiler",
        f"{'kernel':<56} {'n/step':>7} {'µs/step':>9} {'% step':>7}",
        *(line(r.short_name, r.count, r.us) for r in p.rows[:TABLE_ROWS]),
    ]
    rest = p.rows[TABLE_ROWS:]
    if rest:
        label = f"({len(rest)} other kernels)"
        lines.append(line(label, sum(r.count for r in rest), sum(r.us for r in rest)))
    lines += [
        line("kernels, summed", sum(r.count for r in p.rows), p.kernel_us),
        line("idle between kernels inside the graph", None, p.idle_us),
        line("graph span (first kernel start to last kernel end)", None, p.span_us),
    ]
    if p.replay_us is not None:
        lines += [
            line("launch gap between back-to-back replays", None, p.replay_us - p.span_us),
            line("replay, back to back (CUDA events, no profiler)", None, p.replay_us),
        ]
    return "\n".join(lines + _gemm_lines(p.gemms, bandwidth))


def _gemm_lines(gemms: list[GemmRow] | None, bandwidth: float) -> list[str]:
    if gemms is None:
        return ["GEMMs by projection: not attributed (GEMM kernels not in the expected order)"]
    bw = f"{bandwidth / 1e12:.2f} TB/s" if bandwidth else "unknown"
    lines = [
        f"GEMMs by projection (weights + input and output rows, over the copy bandwidth {bw}):",
        f"{'projection':<14} {'kernels':>8} {'µs/step':>9} {'MB':>9} {'GB/s':>8} {'x copy':>7}",
    ]
    for g in gemms:
        vs = f"{g.bytes_per_s / bandwidth:>7.2f}" if bandwidth else f"{'-':>7}"
        lines.append(
            f"{g.name:<14} {_count(g.kernels):>8} {g.us:>9.1f} {g.bytes / 1e6:>9.1f} "
            f"{g.bytes_per_s / 1e9:>8.0f} {vs}"
        )
    return lines


def _count(n: float) -> str:
    return f"{n:.0f}" if abs(n - round(n)) < 1e-9 else f"{n:.2f}"


def model_projections(model: torch.nn.Module) -> tuple[list[Projection], Projection | None]:
    """The decode step's matmuls of a :class:`~workers.models.llama.LlamaModel`, in the
    order a layer runs them, and its LM head (None on a stage without it)."""
    layers = model.layers
    names = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
    per_layer = []
    for name in names:
        linear = layers[0].get_submodule(name)
        short = name.split(".")[-1]
        per_layer.append(Projection(short, linear.in_features, linear.out_features, len(layers)))
    head = model.lm_head
    return per_layer, (
        Projection("lm_head", head.in_features, head.out_features, 1) if head is not None else None
    )


def profile_decode_graph(
    graph: torch.cuda.CUDAGraph, replays: int = 20, gap_s: float = REPLAY_GAP_S
) -> list[list[KernelEvent]]:
    """Replays ``graph`` ``replays + 1`` times under ``torch.profiler`` (a sync and a
    ``gap_s`` sleep after each) and returns the GPU events of each replay but the first (it
    pays CUPTI's start-up). The graph's inputs must be valid: replay it right after the step
    that used it, as ``graph_replay_ms`` does. Raises RuntimeError when the profiler saw no
    replay at all."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(replays + 1):
            graph.replay()
            torch.cuda.synchronize()
            time.sleep(gap_s)
    groups = split_replays(device_events(prof.events()), min_gap_us=gap_s * 1e6 / 2)
    if len(groups) < 2:
        raise RuntimeError(
            f"torch.profiler recorded {len(groups)} bursts of GPU events for {replays + 1} "
            "graph replays: is CUPTI available?"
        )
    return groups[1:]
