"""ReplayConfig: every setting of one `kunserve replay` run, validated on construction.

The docstring under each field is also its `--flag` help text (see client/replay/cli.py).
"""

from __future__ import annotations

import ast
import functools
import inspect
import math
from dataclasses import MISSING, dataclass, fields

from client.replay.metrics import METRIC_NAMES, parse_goodput


@dataclass(frozen=True)
class ReplayConfig:
    """Settings of one replay. Times in seconds, lengths in tokens.

    Raises (on construction):
        ValueError: for any out-of-range value, naming the field.
    """

    host: str = "127.0.0.1"
    """server address; the replay sends nowhere else"""
    port: int = 50051
    """server gRPC port"""
    trace: str = "azure-code"
    """azure-code | azure-conv | mooncake-conv | synthetic | PATH to an Azure or BurstGPT CSV
    or a Mooncake-style JSONL(.gz)"""
    start_s: float = 0.0
    """window start, seconds of trace time"""
    duration_s: float | None = None
    """window length, seconds of trace time (default: to end)"""
    time_scale: float = 1.0
    """compress trace time: 2.0 replays twice as fast (send = t / s)"""
    load_scale: float = 1.0
    """replicate arrivals as KunServe does (TraceUpscaler): each arrival emits ceil(s) copies,
    each kept with probability s / ceil(s)"""
    max_concurrency: int | None = None
    """at most this many requests in flight (client side)"""
    num_prompts: int | None = None
    """send at most this many requests (synthetic: how many; default 1000)"""
    seed: int = 0
    """seed for load scaling, synthetic arrivals and prompt choice"""
    request_rate: float = math.inf
    """synthetic: mean arrival rate, req/s (inf: all at t=0)"""
    burstiness: float = 1.0
    """synthetic: gamma shape of the gaps; 1 = Poisson, < 1 burstier"""
    lengths_from: str = "azure-conv"
    """synthetic: take (input, output) lengths from this trace, or from "sharegpt" turns"""
    burstgpt_model: str | None = None
    """BurstGPT CSV: keep only this Model (e.g. GPT-4)"""
    burstgpt_log_type: str | None = None
    """BurstGPT CSV: keep only this Log Type"""
    tokenizer: str | None = None
    """tokenizer.json path (default: the server"s, via GetModelInfo)"""
    prompts: str | None = None
    """ShareGPT first-turn JSONL(.gz) (default: shipped file)"""
    ignore_hash_ids: bool = False
    """do not rebuild Mooncake prefix sharing from hash_ids"""
    max_input_len: int | None = None
    """clip traced input lengths to this (tokens)"""
    max_output_len: int | None = None
    """clip traced output lengths to this (tokens)"""
    ignore_eos: bool = True
    """generate exactly the traced output length (ignore EOS)"""
    temperature: float = 0.0
    """sampling temperature (0 = greedy)"""
    drain_timeout_s: float = 120.0
    """after the last send, wait this long, then abort what is left (counted failed)"""
    ready_timeout_s: float = 60.0
    """wait this long for the server to report SERVING"""
    sample_interval_s: float = 0.5
    """GetServerInfo polling period (seconds)"""
    goodput: tuple[str, ...] = ()
    """SLOs as KEY:MS pairs, KEY in ttft, tpot, e2el"""
    percentile_metrics: tuple[str, ...] = METRIC_NAMES
    """metrics to report percentiles of"""
    metric_percentiles: tuple[float, ...] = (90.0, 99.0, 99.9)
    """percentiles to report"""
    save_result: bool = False
    """write the result JSON"""
    result_dir: str | None = None
    """folder for the result JSON (default: current)"""
    result_filename: str | None = None
    """result JSON file name (default: vLLM-style name)"""
    save_detailed: bool = False
    """keep per-request arrays in the JSON"""
    plot: str | None = None
    """write a timeline figure to this PNG path"""
    label: str = "grpc"
    """run label; prefixes the default result file name"""
    metadata: tuple[str, ...] = ()
    """KEY=VALUE pairs copied into the result JSON"""
    request_id_prefix: str = ""
    """prefix of request ids (default replay-<8 hex>-)"""
    disable_tqdm: bool = False
    """no progress bar"""

    def __post_init__(self) -> None:
        self._check_positive()
        if self.start_s < 0:
            raise ValueError(f"start_s must be >= 0, got {self.start_s}")
        if not self.host:
            raise ValueError("host must not be empty")
        bad = set(self.percentile_metrics) - set(METRIC_NAMES)
        if bad:
            raise ValueError(f"percentile_metrics {sorted(bad)} unknown; valid: {METRIC_NAMES}")
        if any(not 0 < p < 100 for p in self.metric_percentiles):
            raise ValueError(f"metric_percentiles must be in (0, 100): {self.metric_percentiles}")
        for item in self.metadata:
            if "=" not in item:
                raise ValueError(f"metadata item {item!r} is not KEY=VALUE")
        parse_goodput(self.goodput)

    def _check_positive(self) -> None:
        for name in ("time_scale", "load_scale", "request_rate", "burstiness", "sample_interval_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("duration_s", "max_concurrency", "num_prompts"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        for name in ("max_input_len", "max_output_len"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        for name in ("drain_timeout_s", "ready_timeout_s", "temperature"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @property
    def goodput_slos_ms(self) -> dict[str, float]:
        """The --goodput SLOs as {metric: milliseconds}; empty without --goodput."""
        return parse_goodput(self.goodput)

    @property
    def metadata_dict(self) -> dict[str, str]:
        """--metadata KEY=VALUE pairs as a dict."""
        return dict(item.split("=", 1) for item in self.metadata)

    @property
    def is_synthetic(self) -> bool:
        """True for `--trace synthetic`."""
        return self.trace == "synthetic"


@functools.cache
def _field_docs() -> dict[str, str]:
    """The docstring under each ReplayConfig field, whitespace collapsed."""
    body = ast.parse(inspect.getsource(ReplayConfig)).body[0].body
    docs = {}
    for prev, node in zip(body[:-1], body[1:], strict=True):
        is_doc = isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
        if isinstance(prev, ast.AnnAssign) and is_doc and isinstance(node.value.value, str):
            docs[prev.target.id] = " ".join(node.value.value.split())
    return docs


def field_help(name: str) -> str:
    """The CLI help of ReplayConfig field `name`: its docstring, plus its default if set.

    Raises:
        KeyError: no such field.
    """
    default = {f.name: f.default for f in fields(ReplayConfig)}[name]
    hidden = default is MISSING or default is None or default is False or default in ((), "")
    shown = (
        ",".join(f"{x:g}" if isinstance(x, float) else str(x) for x in default)
        if isinstance(default, tuple)
        else default
    )
    return _field_docs()[name] + ("" if hidden else f" (default {shown})")
