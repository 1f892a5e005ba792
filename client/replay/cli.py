"""`kunserve replay`: replay a real arrival trace (or synthetic arrivals) against one server.

The coordinator's CLI dispatches `kunserve replay ARGS...` to `replay_main(ARGS)`. Flag names
follow `vllm bench serve` where one exists; help texts come from ReplayConfig's fields.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from client.api_types import KunserveError
from client.replay.config import ReplayConfig, field_help
from client.replay.describe import format_summary, summarize_trace
from client.replay.traces import NAMED_TRACES, SYNTHETIC

# Flags by help group: (flag, ReplayConfig field, type); type None is a store_true switch.
_GROUPS: dict[str, tuple[tuple[str, str, type | None], ...]] = {
    "server (the replay sends nowhere else)": (
        ("--host", "host", str),
        ("--port", "port", int),
        ("--ready-timeout", "ready_timeout_s", float),
        ("--request-id-prefix", "request_id_prefix", str),
    ),
    "trace and load shape": (
        ("--trace", "trace", str),
        ("--start", "start_s", float),
        ("--duration", "duration_s", float),
        ("--time-scale", "time_scale", float),
        ("--load-scale", "load_scale", float),
        ("--max-concurrency", "max_concurrency", int),
        ("--num-prompts", "num_prompts", int),
        ("--seed", "seed", int),
        ("--request-rate", "request_rate", float),
        ("--burstiness", "burstiness", float),
        ("--lengths-from", "lengths_from", str),
        ("--burstgpt-model", "burstgpt_model", str),
        ("--burstgpt-log-type", "burstgpt_log_type", str),
        ("--drain-timeout", "drain_timeout_s", float),
    ),
    "prompts, lengths and sampling": (
        ("--tokenizer", "tokenizer", str),
        ("--prompts", "prompts", str),
        ("--ignore-hash-ids", "ignore_hash_ids", None),
        ("--max-input-len", "max_input_len", int),
        ("--max-output-len", "max_output_len", int),
        ("--temperature", "temperature", float),
    ),
    "metrics and output": (
        ("--sample-interval", "sample_interval_s", float),
        ("--result-dir", "result_dir", str),
        ("--result-filename", "result_filename", str),
        ("--save-detailed", "save_detailed", None),
        ("--plot", "plot", str),
        ("--label", "label", str),
        ("--disable-tqdm", "disable_tqdm", None),
    ),
}


def _csv(kind: type) -> Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        return tuple(kind(x) for x in text.split(",") if x.strip())

    return parse


def _add_config_flags(p: argparse.ArgumentParser) -> dict[str, argparse._ArgumentGroup]:
    """Adds one flag per ReplayConfig field; unset flags keep the config's defaults."""
    groups = {}
    for title, flags in _GROUPS.items():
        g = groups[title] = p.add_argument_group(title)
        for flag, dest, kind in flags:
            kw = {"action": "store_true"} if kind is None else {"type": kind}
            g.add_argument(flag, dest=dest, default=argparse.SUPPRESS, help=field_help(dest), **kw)
    return groups


def _add_special_flags(groups: dict[str, argparse._ArgumentGroup]) -> None:
    """Flags whose syntax is not `--flag VALUE`: lists, a negatable switch, --save-result."""
    out = groups["metrics and output"]
    groups["prompts, lengths and sampling"].add_argument(
        "--ignore-eos",
        dest="ignore_eos",
        action=argparse.BooleanOptionalAction,
        default=argparse.SUPPRESS,
        help=field_help("ignore_eos"),
    )
    lists = (
        ("--goodput", "goodput", {"nargs": "+", "metavar": "KEY:MS"}),
        ("--percentile-metrics", "percentile_metrics", {"type": _csv(str), "metavar": "M,..."}),
        ("--metric-percentiles", "metric_percentiles", {"type": _csv(float), "metavar": "P,..."}),
        ("--metadata", "metadata", {"nargs": "+", "metavar": "KEY=VALUE"}),
    )
    for flag, dest, kw in lists:
        out.add_argument(flag, dest=dest, default=argparse.SUPPRESS, help=field_help(dest), **kw)
    out.add_argument(
        "--save-result",
        dest="save_result_path",
        nargs="?",
        const="",
        default=None,
        metavar="PATH",
        help="write the result JSON (to PATH, or to a vLLM-style name in --result-dir)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The `kunserve replay` argument parser (dest names are ReplayConfig field names)."""
    p = argparse.ArgumentParser(
        prog="kunserve replay",
        description="Replay an LLM arrival trace against a kunserve server and report "
        "TTFT/TPOT/ITL/E2EL as `vllm bench serve` does. Shipped traces: "
        f"{', '.join(sorted(NAMED_TRACES))}; or '{SYNTHETIC}', or a file path.",
    )
    _add_special_flags(_add_config_flags(p))
    g = p.add_argument_group("describe (prints a trace summary; contacts no server)")
    g.add_argument(
        "--describe",
        action="store_true",
        help="print the window's arrival-rate summary and busiest windows, then exit",
    )
    g.add_argument(
        "--describe-window",
        type=float,
        default=10.0,
        help="width of the busiest windows, seconds of trace time (default 10)",
    )
    g.add_argument("--describe-top", type=int, default=5,
                   help="how many busiest windows to list (default 5)")  # fmt: skip
    return p


def config_from_args(args: argparse.Namespace) -> ReplayConfig:
    """A ReplayConfig from parsed flags.

    Raises:
        ValueError: an invalid value (ReplayConfig's validation).
    """
    skip = {"save_result_path", "describe", "describe_window", "describe_top"}
    values = {k: v for k, v in vars(args).items() if k not in skip}
    for key in ("goodput", "metadata"):
        if key in values:
            values[key] = tuple(values[key])
    path = args.save_result_path
    if path is not None:
        values["save_result"] = True
        if path:
            values["result_dir"] = str(Path(path).parent)
            values["result_filename"] = Path(path).name
    return ReplayConfig(**values)


def describe_main(config: ReplayConfig, window_s: float, top_k: int) -> int:
    """Prints the summary of the configured trace window; contacts no server."""
    from client.replay.prompts import load_tokenizer
    from client.replay.workload import build_workload, load_configured_trace

    tokenizer = load_tokenizer(config.tokenizer) if config.tokenizer else None
    trace = load_configured_trace(config, tokenizer)
    summary = summarize_trace(trace, config.start_s, config.duration_s, window_s, top_k)
    print(format_summary(summary))
    workload = build_workload(trace, config)
    print(
        f"Replay plan: {len(workload.requests)} requests over {workload.span_s:.1f} s "
        f"(time x{config.time_scale:g}, load x{config.load_scale:g}); stops by "
        f"{workload.span_s + config.drain_timeout_s:.1f} s"
    )
    if summary.busiest:
        b = summary.busiest[0]
        print(f"To replay the busiest window: --start {max(b.start_s - 25, 0):.0f} --duration 60")
    return 0


def replay_main(argv: Sequence[str] | None = None) -> int:
    """Runs `kunserve replay`; returns the exit code (0 ok, 1 server error, 2 bad input)."""
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
        if args.describe:
            return describe_main(config, args.describe_window, args.describe_top)
        from client.replay.report import format_table
        from client.replay.runner import run_replay

        result = run_replay(config)
    except KunserveError as err:
        print(f"error: {err.code_name}: {err.message}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(format_table(result))
    if result.result_path:
        print(f"result JSON: {result.result_path}")
    if result.plot_path:
        print(f"timeline plot: {result.plot_path}")
    return 0


if __name__ == "__main__":
    sys.exit(replay_main())
