"""``kunserve bench engine`` with ``--profile BATCHES``: the same flags and the same bench
(``workers.bench.run_engine_bench``), plus a per-kernel table of the decode graph at each
profiled batch and every context of the grid (``workers/bench_profile.py``).

Until ``coordinator/cli.py`` exposes ``--profile`` on ``bench engine`` itself, the device
scripts run this. Usage (repo root, PYTHONPATH holding it, as env.sh sets):

    python3 tools/device/bench_engine.py --model llama-3-8b --load-format dummy \\
        --batch-sizes 1,64 --contexts 1024 --no-prefill --no-hf --profile 1,64
"""

from __future__ import annotations

import argparse
import logging
import sys

from coordinator.cli import add_bench_args, engine_config
from workers.bench import run_engine_bench
from workers.checkpoint.registry import resolve_model


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    extra = argparse.ArgumentParser(add_help=False)
    extra.add_argument(
        "--profile",
        default="",
        help="batch sizes whose decode graph is profiled kernel by kernel at every context "
        "(comma-separated; CUDA graphs only)",
    )
    known, rest = extra.parse_known_args(sys.argv[1:] if argv is None else argv)
    if {"-h", "--help"} & set(rest):
        print(extra.format_help().replace("usage:", "this script's own flag:", 1))
    parser = argparse.ArgumentParser(prog="bench_engine.py", description=__doc__)
    add_bench_args(parser)
    args = parser.parse_args(["engine", *rest])
    logging.basicConfig(level=logging.WARNING)
    run_engine_bench(
        engine_config(args, resolve_model(args.model)),
        _ints(args.batch_sizes),
        _ints(args.contexts),
        args.steps,
        args.output_json,
        prefill=not args.no_prefill,
        hf=not args.no_hf,
        profile=_ints(known.profile),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
