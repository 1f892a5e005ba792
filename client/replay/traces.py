"""Arrival traces: parsers for the shipped and user-supplied formats, and synthetic arrivals.

Every loader returns a `Trace` whose records are sorted by arrival time, with times in seconds
since the trace's first arrival. Supported inputs:

| format | columns read (by name) | time unit |
|---|---|---|
| Azure LLM inference 2023 CSV | `TIMESTAMP` (datetime), `ContextTokens`, `GeneratedTokens` | datetime |
| BurstGPT CSV | `Timestamp`, `Request tokens`, `Response tokens`, optional `Model`, `Log Type` | s |
| Mooncake / timed-trace JSONL (optionally .gz) | `timestamp`, `input_length`, `output_length`, `hash_ids` | ms |

Rows with fewer than one input or output token (failed requests in BurstGPT) are skipped and
counted in `Trace.num_skipped`.
"""

from __future__ import annotations

import csv
import datetime as dt
import gzip
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
"""client/data: the traces and prompts shipped with the project (see its README)."""

NAMED_TRACES: dict[str, Path] = {
    "azure-code": DATA_DIR / "azure_llm_2023" / "AzureLLMInferenceTrace_code.csv",
    "azure-conv": DATA_DIR / "azure_llm_2023" / "AzureLLMInferenceTrace_conv.csv",
    "mooncake-conv": DATA_DIR / "mooncake_fast25" / "conversation_trace.jsonl.gz",
}
"""`--trace` names of the shipped traces."""

SYNTHETIC = "synthetic"
"""`--trace synthetic`: Poisson/gamma arrivals with lengths drawn from a dataset."""


@dataclass(frozen=True)
class TraceRecord:
    """One traced request.

    Attributes:
        arrival_s: seconds since the trace's start (its first arrival, for file traces).
        input_len: prompt length (tokens of the traced model).
        output_len: generated length (tokens).
        hash_ids: Mooncake prefix-block hashes (512 tokens a block); () when unknown.
    """

    arrival_s: float
    input_len: int
    output_len: int
    hash_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Trace:
    """A parsed trace, records sorted by `arrival_s`.

    File traces start at 0 (their first arrival); synthetic ones keep their own origin.
    """

    name: str
    source: str
    records: tuple[TraceRecord, ...]
    num_skipped: int = 0

    @property
    def arrivals_s(self) -> np.ndarray:
        """Arrival times, float64 [num_requests], seconds."""
        return np.fromiter((r.arrival_s for r in self.records), np.float64, len(self.records))

    @property
    def span_s(self) -> float:
        """Seconds from the first to the last arrival."""
        return self.records[-1].arrival_s if self.records else 0.0


def _make_trace(
    name: str,
    source: str,
    rows: Iterable[tuple[float, int, int, tuple[int, ...]]],
    shift: bool = True,
) -> Trace:
    """Sorts rows by time, skips rows without tokens and (if `shift`) moves the first to 0."""
    kept, skipped = [], 0
    for t, n_in, n_out, hashes in rows:
        if n_in < 1 or n_out < 1:
            skipped += 1
            continue
        kept.append((t, n_in, n_out, hashes))
    kept.sort(key=lambda r: r[0])
    t0 = kept[0][0] if kept and shift else 0.0
    records = tuple(TraceRecord(t - t0, n_in, n_out, h) for t, n_in, n_out, h in kept)
    return Trace(name, source, records, skipped)


def _parse_azure_timestamp(text: str) -> tuple[int, float]:
    """'2023-11-16 18:17:03.9799600' -> (day ordinal, seconds since midnight), kept apart so
    differences keep all 7 fractional digits."""
    date_part, time_part = text.strip().split(" ")
    hours, minutes, seconds = time_part.split(":")
    seconds_of_day = int(hours) * 3600.0 + int(minutes) * 60.0 + float(seconds)
    return dt.date.fromisoformat(date_part).toordinal(), seconds_of_day


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8", newline="")


def load_azure_csv(path: Path, name: str = "") -> Trace:
    """Parses an Azure LLM inference 2023 CSV (`TIMESTAMP, ContextTokens, GeneratedTokens`)."""
    with _open_text(path) as f:
        raw = [
            (_parse_azure_timestamp(row["TIMESTAMP"]), row["ContextTokens"], row["GeneratedTokens"])
            for row in csv.DictReader(f)
        ]
    day0, sec0 = raw[0][0] if raw else (0, 0.0)
    rows = [
        ((day - day0) * 86400.0 + (sec - sec0), int(n_in), int(n_out), ())
        for (day, sec), n_in, n_out in raw
    ]
    return _make_trace(name or path.name, str(path), rows)


def load_burstgpt_csv(
    path: Path, name: str = "", model: str | None = None, log_type: str | None = None
) -> Trace:
    """Parses a BurstGPT-format CSV, selecting columns by header name.

    Args:
        model: keep only rows whose `Model` equals this (e.g. "ChatGPT", "GPT-4"); None keeps all.
        log_type: keep only rows whose `Log Type` equals this; None keeps all.
    """
    rows = []
    with _open_text(path) as f:
        for row in csv.DictReader(f):
            if model is not None and row.get("Model") != model:
                continue
            if log_type is not None and row.get("Log Type") != log_type:
                continue
            rows.append(
                (
                    float(row["Timestamp"]),
                    int(float(row["Request tokens"])),
                    int(float(row["Response tokens"])),
                    (),
                )
            )
    return _make_trace(name or path.name, str(path), rows)


def load_timed_jsonl(path: Path, name: str = "", time_unit_s: float = 0.001) -> Trace:
    """Parses Mooncake-style JSONL (`timestamp` in ms by default, lengths, `hash_ids`)."""
    rows = []
    with _open_text(path) as f:
        for line in f:
            if not line.strip():
                continue
            obj = json.loads(line)
            rows.append(
                (
                    float(obj["timestamp"]) * time_unit_s,
                    int(obj["input_length"]),
                    int(obj["output_length"]),
                    tuple(obj.get("hash_ids", ())),
                )
            )
    return _make_trace(name or path.name, str(path), rows)


def load_trace(
    name_or_path: str, burstgpt_model: str | None = None, burstgpt_log_type: str | None = None
) -> Trace:
    """Loads a shipped trace by name (see NAMED_TRACES) or a file by path; format by content.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: the file's format is not one of the supported ones.
    """
    if name_or_path in NAMED_TRACES:
        path, name = NAMED_TRACES[name_or_path], name_or_path
    else:
        path, name = Path(name_or_path), Path(name_or_path).name
        if not path.is_file():
            raise FileNotFoundError(
                f"trace {name_or_path!r} is neither a file nor one of "
                f"{sorted(NAMED_TRACES)} or {SYNTHETIC!r}"
            )
    if path.name.endswith((".jsonl", ".jsonl.gz", ".json")):
        return load_timed_jsonl(path, name)
    with _open_text(path) as f:
        header = set(next(csv.reader(f), []))
    if {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} <= header:
        return load_azure_csv(path, name)
    if {"Timestamp", "Request tokens", "Response tokens"} <= header:
        return load_burstgpt_csv(path, name, burstgpt_model, burstgpt_log_type)
    raise ValueError(
        f"{path}: unknown trace format (header {sorted(header)}); expected Azure "
        "(TIMESTAMP, ContextTokens, GeneratedTokens), BurstGPT (Timestamp, Request tokens, "
        "Response tokens) or Mooncake JSONL (timestamp, input_length, output_length)"
    )


def gamma_arrivals(
    num_requests: int, request_rate: float, burstiness: float, rng: np.random.Generator
) -> np.ndarray:
    """Synthetic arrival times (seconds, float64 [num_requests]).

    Inter-arrival gaps are Gamma(shape=burstiness, scale=1/(rate*burstiness)): burstiness 1 is a
    Poisson process, < 1 burstier, > 1 more regular. As in `vllm bench serve`, the times are then
    rescaled so that the last arrival is at num_requests / request_rate, which keeps the mean
    rate exact across seeds. An infinite rate sends everything at t = 0.
    """
    if np.isinf(request_rate):
        return np.zeros(num_requests)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=num_requests)
    times = np.cumsum(gaps)
    return times * ((num_requests / request_rate) / times[-1])


def synthetic_trace(
    arrivals_s: np.ndarray, lengths: list[tuple[int, int]], name: str = SYNTHETIC
) -> Trace:
    """Pairs synthetic arrival times with (input_len, output_len) pairs of equal count."""
    if len(arrivals_s) != len(lengths):
        raise ValueError(f"{len(arrivals_s)} arrivals but {len(lengths)} length pairs")
    rows = [
        (float(t), n_in, n_out, ()) for t, (n_in, n_out) in zip(arrivals_s, lengths, strict=True)
    ]
    return _make_trace(name, name, rows, shift=False)


def sample_lengths(trace: Trace, n: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Draws n (input_len, output_len) pairs from a trace's rows, with replacement."""
    idx = rng.integers(0, len(trace.records), size=n)
    return [(trace.records[i].input_len, trace.records[i].output_len) for i in idx]
