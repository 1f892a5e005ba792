"""``kunserve``: serve, generate, replay, bench."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from workers.config import (
    LOG_FORMAT,
    PIPELINE_CHUNK_COSTS,
    CacheConfig,
    EngineConfig,
    SchedulerConfig,
)

if TYPE_CHECKING:
    from planner.config import PlannerConfig

DEFAULT_MODEL = "SmolLM2-135M-Instruct"


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each dataclass field (STYLE.md 5: config docs double as CLI help)."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body
    docs = {}
    for prev, node in zip(body, body[1:], strict=False):
        if (
            isinstance(prev, ast.AnnAssign)
            and isinstance(node, ast.Expr)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
        ):
            docs[prev.target.id] = " ".join(node.value.value.split())
    return docs


def add_serve_args(p: argparse.ArgumentParser) -> None:
    from coordinator.server import ServeConfig

    serve = field_docs(ServeConfig)
    add_engine_args(p)
    p.add_argument("--served-model-name", default=None, help="name clients use (default: --model)")
    p.add_argument(
        "--address",
        default=None,
        help="Ray cluster to join ('auto' for a running one); default: start a local one",
    )
    p.add_argument("--host", default="0.0.0.0", help=serve["host"])
    p.add_argument("--port", type=int, default=50051, help=serve["port"])
    p.add_argument(
        "--metrics-port", type=int, default=8000, help=serve["metrics_port"] + " (0 disables)"
    )
    p.add_argument(
        "--num-gpus",
        type=int,
        default=None,
        help="GPU workers, one per GPU (default: every GPU in the cluster)",
    )
    p.add_argument(
        "--cpu-workers",
        type=int,
        default=None,
        help="run N CPU workers instead of GPU workers (default 1 when no GPU)",
    )
    p.add_argument("--overload-policy", default="drop", help=serve["overload_policy"])
    p.add_argument(
        "--log-level",
        default="INFO",
        help="coordinator and worker log level (DEBUG logs what a transition does to each request)",
    )
    planner = p.add_argument_group("planner (automatic drop and restore)")
    add_planner_args(planner)
    planner.add_argument(
        "--no-auto-transitions",
        dest="auto_transitions",
        action="store_false",
        help=serve["auto_transitions"],
    )


PLANNER_TIMING = (
    "sample_interval_s",
    "window_s",
    "smoothing_s",
    "min_dwell_s",
    "cooldown_s",
    "at_once_check_s",
)
"""PlannerConfig fields whose flag gets a ``--planner-`` prefix (a bare --window-s says too
little on ``kunserve serve``); the others' flags are their names."""


def planner_flag(name: str) -> str:
    """The ``kunserve serve`` flag of a PlannerConfig field: --drop-threshold,
    --planner-cooldown-s."""
    return "--" + ("planner-" if name in PLANNER_TIMING else "") + name.replace("_", "-")


def add_planner_args(p: argparse._ActionsContainer) -> None:
    """One flag per PlannerConfig field, its docstring as help, its default as default."""
    from planner.config import PlannerConfig

    docs = field_docs(PlannerConfig)
    for f in dataclasses.fields(PlannerConfig):
        p.add_argument(
            planner_flag(f.name),
            dest="planner_" + f.name,
            type=type(f.default),
            default=f.default,
            metavar="S" if f.name.endswith("_s") else ("N" if isinstance(f.default, int) else "X"),
            help=f"{docs[f.name]} (default {f.default})",
        )


def planner_config(args: argparse.Namespace) -> PlannerConfig:
    """The PlannerConfig of the parsed flags; raises ValueError on invalid values."""
    from planner.config import PlannerConfig

    names = [f.name for f in dataclasses.fields(PlannerConfig)]
    return PlannerConfig(**{n: getattr(args, "planner_" + n) for n in names})


def add_engine_args(p: argparse.ArgumentParser) -> None:
    cache, sched, eng = (field_docs(c) for c in (CacheConfig, SchedulerConfig, EngineConfig))
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"model name, HF directory or .gguf file (default {DEFAULT_MODEL})",
    )
    p.add_argument("--block-size", type=int, default=16, help=cache["block_size"])
    p.add_argument(
        "--gpu-memory-utilization", type=float, default=0.9, help=cache["gpu_memory_utilization"]
    )
    p.add_argument("--cpu-kv-cache-gb", type=float, default=1.0, help=cache["cpu_kv_cache_gb"])
    p.add_argument("--num-kv-blocks", type=int, default=None, help=cache["num_kv_blocks"])
    p.add_argument(
        "--kv-exchange-bytes-per-step",
        type=int,
        default=None,
        help=cache["kv_exchange_bytes_per_step"],
    )
    p.add_argument(
        "--max-num-batched-tokens", type=int, default=2048, help=sched["max_num_batched_tokens"]
    )
    p.add_argument("--max-num-seqs", type=int, default=256, help=sched["max_num_seqs"])
    p.add_argument("--max-model-len", type=int, default=None, help=sched["max_model_len"])
    p.add_argument("--max-waiting", type=int, default=4096, help=sched["max_waiting"])
    p.add_argument(
        "--pipeline-micro-batches",
        type=int,
        default=None,
        help=sched["pipeline_micro_batches"],
    )
    p.add_argument(
        "--pipeline-max-num-batched-tokens",
        type=int,
        default=None,
        help=sched["pipeline_max_num_batched_tokens"],
    )
    p.add_argument(
        "--pipeline-chunk-cost",
        default="tokens",
        choices=list(PIPELINE_CHUNK_COSTS),
        help=sched["pipeline_chunk_cost"],
    )
    p.add_argument("--dtype", default="auto", help=eng["dtype"])
    p.add_argument(
        "--load-format", default="auto", choices=["auto", "dummy"], help=eng["load_format"]
    )
    p.add_argument("--attention-backend", default="auto", help=eng["attention_backend"])
    p.add_argument("--seed", type=int, default=0, help=eng["seed"])
    p.add_argument("--enforce-eager", action="store_true", help=eng["enforce_eager"])
    p.add_argument("--memory-backend", default="auto", help=eng["memory_backend"])
    p.add_argument(
        "--decode-gemm", default="cublas", choices=["cublas", "triton"], help=eng["decode_gemm"]
    )


def engine_config(args: argparse.Namespace, model_path: Path) -> EngineConfig:
    return EngineConfig(
        model_path=str(model_path),
        load_format=args.load_format,
        dtype=args.dtype,
        attention_backend=args.attention_backend,
        cache=CacheConfig(
            block_size=args.block_size,
            gpu_memory_utilization=args.gpu_memory_utilization,
            cpu_kv_cache_gb=args.cpu_kv_cache_gb,
            num_kv_blocks=args.num_kv_blocks,
            kv_exchange_bytes_per_step=args.kv_exchange_bytes_per_step,
        ),
        scheduler=SchedulerConfig(
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_num_seqs=args.max_num_seqs,
            max_model_len=args.max_model_len,
            max_waiting=args.max_waiting,
            pipeline_micro_batches=args.pipeline_micro_batches,
            pipeline_max_num_batched_tokens=args.pipeline_max_num_batched_tokens,
            pipeline_chunk_cost=args.pipeline_chunk_cost,
        ),
        seed=args.seed,
        enforce_eager=args.enforce_eager,
        memory_backend=args.memory_backend,
        decode_gemm=args.decode_gemm,
    )


def engine_for_policy(engine: EngineConfig, overload_policy: str, num_workers: int) -> EngineConfig:
    """The workers' config for a server of ``num_workers`` instances: with the ``drop`` policy
    and two or more, each captures its two-stage graphs at start-up, so a drop's first decode
    micro-batches replay (EngineConfig.stage_graphs_at_start)."""
    if overload_policy == "drop" and num_workers >= 2:
        return dataclasses.replace(engine, stage_graphs_at_start=2)
    return engine


def serve_main(args: argparse.Namespace) -> int:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from coordinator.server import CoordinatorServer, ServeConfig
    from planner.policies import check_overload_policy
    from workers.checkpoint.registry import resolve_model

    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
    log = logging.getLogger("kunserve")
    check_overload_policy(args.overload_policy)
    planner = planner_config(args)
    model_path = resolve_model(args.model)
    engine = engine_config(args, model_path)
    engine.model_config()  # fail here, before Ray starts, on a bad config.json
    ray.init(
        address=args.address,
        include_dashboard=False,
        log_to_driver=True,
        logging_level=logging.WARNING,
    )
    gpus = int(ray.cluster_resources().get("GPU", 0))
    use_gpu = args.cpu_workers is None and gpus > 0
    num_workers = (args.num_gpus or gpus) if use_gpu else (args.cpu_workers or 1)
    engine = engine_for_policy(engine, args.overload_policy, num_workers)
    config = ServeConfig(
        engine=engine,
        served_model_name=args.served_model_name or args.model,
        host=args.host,
        port=args.port,
        metrics_port=args.metrics_port or None,
        num_workers=num_workers,
        use_gpu=use_gpu,
        overload_policy=args.overload_policy,
        planner=planner,
        auto_transitions=args.auto_transitions,
        log_level=args.log_level.upper(),
    )
    actor = (
        ray.remote(CoordinatorServer)
        .options(
            name="kunserve-coordinator",
            num_cpus=0,
            max_concurrency=64,
            scheduling_strategy=NodeAffinitySchedulingStrategy(
                node_id=ray.get_runtime_context().get_node_id(), soft=False
            ),
        )
        .remote(config)
    )
    address = ray.get(actor.start.remote())
    log.info(
        "gRPC listening on %s; starting %d %s worker(s) for %s",
        address,
        num_workers,
        "GPU" if use_gpu else "CPU",
        model_path,
    )
    ray.get(actor.wait_ready.remote(timeout=1800))
    metrics = f", metrics on :{config.metrics_port}/metrics" if config.metrics_port else ""
    print(f"kunserve: serving {config.served_model_name} on {address}{metrics}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.info("shutting down")
    ray.get(actor.shutdown.remote(), timeout=30)
    ray.shutdown()
    return 0


def bench_main(args: argparse.Namespace) -> int:
    from workers.checkpoint.registry import resolve_model

    logging.basicConfig(level=logging.WARNING)
    if args.bench == "kernels":
        from kernels.bench import run_kernel_bench

        run_kernel_bench(args.output_json, args.only)
        return 0
    from workers.bench import run_engine_bench

    config = engine_config(args, resolve_model(args.model))
    run_engine_bench(
        config,
        _ints(args.batch_sizes),
        _ints(args.contexts),
        args.steps,
        args.output_json,
        prefill=not args.no_prefill,
        hf=not args.no_hf,
        profile=_ints(args.profile),
        mixed_steps=not args.no_mixed,
        chunk_depths=_ints(args.chunk_depths),
    )
    return 0


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def add_bench_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bench", required=True)
    eng = sub.add_parser(
        "engine",
        help="decode step time vs the HBM floor (and eager, with CUDA graphs), prefill "
        "TFLOP/s vs the bf16 matmul rate, decode vs HF transformers",
    )
    add_engine_args(eng)
    eng.add_argument("--batch-sizes", default="1,8,64,128,256")
    eng.add_argument("--contexts", default="1024,4096")
    eng.add_argument("--steps", type=int, default=32, help="timed decode steps per point")
    eng.add_argument("--output-json", default=None)
    eng.add_argument(
        "--no-prefill", action="store_true", help="skip prefill at 8k tokens (1x8192, 8x1024)"
    )
    eng.add_argument(
        "--no-hf", action="store_true", help="skip the HF transformers decode baseline"
    )
    eng.add_argument(
        "--no-mixed",
        action="store_true",
        help="skip the mixed steps (a prefill chunk + 32 decodes, piecewise graphs vs eager)",
    )
    eng.add_argument(
        "--chunk-depths",
        default="",
        metavar="CONTEXTS",
        help="contexts (e.g. 1024,4096,7168) at which a 1,024-token prefill chunk ends: its "
        "time at each against the shallowest and against its FLOPs (how attention over a "
        "long prompt slows its later chunks)",
    )
    eng.add_argument(
        "--profile",
        default="",
        metavar="BATCHES",
        help="batch sizes (e.g. 1,64) whose decode graph is then profiled kernel by kernel at "
        "every context: time per kernel family and per layer",
    )
    sub.add_parser(
        "drop",
        help="a forced drop and restore under live decode against a running server: drop and "
        "restore time vs the link floor, KV capacity vs its bound, token gaps vs TBT",
        add_help=False,
    )
    ker = sub.add_parser("kernels", help="Triton kernels vs torch SDPA and the HBM floor")
    ker.add_argument("--output-json", default=None)
    ker.add_argument(
        "--only",
        choices=["skinny", "mixed", "chunks"],
        default=None,
        help="run only these tables: skinny GEMMs, mixed-step attention, or a prefill chunk's "
        "attention by depth at several tile configurations",
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "generate":
        from client.cli import generate_main

        return generate_main(argv[1:])
    if argv and argv[0] == "replay":
        from client.replay.cli import replay_main

        return replay_main(argv[1:])
    if argv[:2] == ["bench", "drop"]:
        from client.transition_bench import main as drop_bench_main

        return drop_bench_main(argv[2:])
    if argv and argv[0] == "admin":
        from coordinator.admin_cli import admin_main

        return admin_main(argv[1:])
    parser = argparse.ArgumentParser(prog="kunserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    add_serve_args(sub.add_parser("serve", help="serve a model over gRPC"))
    add_bench_args(sub.add_parser("bench", help="benchmarks, each beside its floor or baseline"))
    sub.add_parser("generate", help="stream one completion from a server", add_help=False)
    sub.add_parser("replay", help="replay a request trace against a server", add_help=False)
    args = parser.parse_args(argv)
    if args.command == "bench":
        return bench_main(args)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    return serve_main(args)


if __name__ == "__main__":
    sys.exit(main())
