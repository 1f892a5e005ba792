"""From a trace to the replay's schedule: window, load scaling, time scaling, length clipping.

Order of operations: pick the window [start, start + duration) of trace time; replicate
arrivals by `load_scale`; keep the first `num_prompts`; divide times by `time_scale`; clip
lengths to the limits and the model's context.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tokenizers import Tokenizer

from client.replay.config import ReplayConfig
from client.replay.traces import (
    Trace,
    TraceRecord,
    gamma_arrivals,
    load_trace,
    sample_lengths,
    synthetic_trace,
)

DEFAULT_SYNTHETIC_PROMPTS = 1000
"""Requests in a synthetic run without --num-prompts (vLLM's default)."""


@dataclass(frozen=True)
class PlannedRequest:
    """One request of the schedule. Times in seconds, lengths in tokens.

    Attributes:
        send_s: when to send it, seconds after the replay starts.
        trace_arrival_s: its arrival in trace time.
        input_len / output_len: what will be sent (after clipping).
        traced_input_len / traced_output_len: what the trace says.
    """

    index: int
    send_s: float
    trace_arrival_s: float
    input_len: int
    output_len: int
    traced_input_len: int
    traced_output_len: int
    hash_ids: tuple[int, ...] = ()

    @property
    def input_clipped(self) -> bool:
        """True when the sent input is shorter than the traced one."""
        return self.input_len < self.traced_input_len

    @property
    def output_clipped(self) -> bool:
        """True when the requested output is shorter than the traced one."""
        return self.output_len < self.traced_output_len


@dataclass(frozen=True)
class Workload:
    """The schedule of one replay."""

    trace_name: str
    requests: tuple[PlannedRequest, ...]
    window_start_s: float
    window_end_s: float
    time_scale: float
    load_scale: float
    num_traced_in_window: int

    @property
    def span_s(self) -> float:
        """Seconds from the replay's start to its last send."""
        return max((r.send_s for r in self.requests), default=0.0)

    @property
    def num_clipped(self) -> int:
        """Requests whose input or output length was clipped."""
        return sum(r.input_clipped or r.output_clipped for r in self.requests)

    @property
    def num_clipped_input(self) -> int:
        """Requests whose input length was clipped."""
        return sum(r.input_clipped for r in self.requests)

    @property
    def num_clipped_output(self) -> int:
        """Requests whose output length was clipped."""
        return sum(r.output_clipped for r in self.requests)


def select_window(trace: Trace, start_s: float, duration_s: float | None) -> list[TraceRecord]:
    """Records arriving in [start_s, start_s + duration_s) (to the end when duration is None)."""
    end_s = math.inf if duration_s is None else start_s + duration_s
    return [r for r in trace.records if start_s <= r.arrival_s < end_s]


def scale_load(
    records: Sequence[TraceRecord], load_scale: float, rng: np.random.Generator
) -> list[TraceRecord]:
    """Replicates arrivals as KunServe does (TraceUpscaler): each record emits ceil(s)
    candidates, each kept with probability s / ceil(s); expected count s per record.
    s = 1 keeps every record once; s < 1 thins the trace.
    """
    if load_scale == 1.0:
        return list(records)
    copies = math.ceil(load_scale)
    keep_p = load_scale / copies
    kept = rng.random((len(records), copies)) < keep_p
    return [r for r, row in zip(records, kept, strict=True) for k in row if k]


def clip_lengths(
    input_len: int,
    output_len: int,
    max_input_len: int | None,
    max_output_len: int | None,
    max_model_len: int | None,
) -> tuple[int, int]:
    """Clips (input, output) to the limits and so that input + output <= max_model_len.

    The output is clipped first to max_output_len and to max_model_len - 1; then the input to
    max_input_len and to max_model_len - output. Both stay >= 1.
    """
    out = output_len if max_output_len is None else min(output_len, max_output_len)
    inp = input_len if max_input_len is None else min(input_len, max_input_len)
    if max_model_len is not None:
        out = min(out, max_model_len - 1)
        inp = min(inp, max_model_len - out)
    return max(inp, 1), max(out, 1)


def build_workload(
    trace: Trace, config: ReplayConfig, max_model_len: int | None = None
) -> Workload:
    """Applies the config's window, load scale, prompt cap, time scale and length limits."""
    rng = np.random.default_rng(config.seed)
    window = select_window(trace, config.start_s, config.duration_s)
    scaled = scale_load(window, config.load_scale, rng)
    if config.num_prompts is not None:
        scaled = scaled[: config.num_prompts]
    requests = []
    for i, r in enumerate(scaled):
        n_in, n_out = clip_lengths(
            r.input_len, r.output_len, config.max_input_len, config.max_output_len, max_model_len
        )
        send_s = (r.arrival_s - config.start_s) / config.time_scale
        requests.append(
            PlannedRequest(
                i, send_s, r.arrival_s, n_in, n_out, r.input_len, r.output_len, r.hash_ids
            )
        )
    end_s = trace.span_s if config.duration_s is None else config.start_s + config.duration_s
    return Workload(
        trace.name,
        tuple(requests),
        config.start_s,
        end_s,
        config.time_scale,
        config.load_scale,
        len(window),
    )


def load_configured_trace(config: ReplayConfig, tokenizer: Tokenizer | None = None) -> Trace:
    """The trace named by the config; for `synthetic`, generated from its rate and burstiness.

    Raises:
        ValueError: `--lengths-from sharegpt` without a tokenizer.
    """
    if not config.is_synthetic:
        return load_trace(config.trace, config.burstgpt_model, config.burstgpt_log_type)
    n = config.num_prompts or DEFAULT_SYNTHETIC_PROMPTS
    rng = np.random.default_rng(config.seed)
    arrivals = gamma_arrivals(n, config.request_rate, config.burstiness, rng)
    if config.lengths_from == "sharegpt":
        if tokenizer is None:
            raise ValueError("--lengths-from sharegpt needs a tokenizer (--tokenizer PATH)")
        from client.replay.prompts import load_sharegpt, sharegpt_lengths

        lengths = sharegpt_lengths(load_sharegpt(config.prompts), tokenizer, n, config.seed)
    else:
        source = load_trace(config.lengths_from, config.burstgpt_model, config.burstgpt_log_type)
        lengths = sample_lengths(source, n, rng)
    return synthetic_trace(arrivals, lengths, name=f"synthetic({config.lengths_from})")
