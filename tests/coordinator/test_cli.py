"""``kunserve serve`` flags: every PlannerConfig field is a flag, validated by PlannerConfig."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from coordinator.cli import (
    add_serve_args,
    engine_config,
    engine_for_policy,
    planner_config,
    planner_flag,
)
from planner.config import PlannerConfig
from workers.config import (
    EXCHANGE_FALLBACK_BYTES,
    EXCHANGE_STEP_S,
    PIPELINE_TOKENS,
    EngineConfig,
    exchange_bytes_per_step,
)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_args(parser)
    return parser.parse_args(list(argv))


def test_planner_flags_default_to_the_config_defaults() -> None:
    args = parse()
    assert planner_config(args) == PlannerConfig()
    assert args.auto_transitions is True
    flags = [planner_flag(f.name) for f in dataclasses.fields(PlannerConfig)]
    assert flags[:3] == ["--drop-threshold", "--restore-threshold", "--planner-sample-interval-s"]
    assert "--planner-cooldown-s" in flags and "--max-group-size" in flags


def test_planner_flags_set_the_config() -> None:
    args = parse(
        "--drop-threshold",
        "0.9",
        "--planner-cooldown-s",
        "1",
        "--max-group-size",
        "2",
        "--no-auto-transitions",
    )
    config = planner_config(args)
    assert (config.drop_threshold, config.cooldown_s, config.max_group_size) == (0.9, 1.0, 2)
    assert args.auto_transitions is False


def test_invalid_planner_flags_raise() -> None:
    with pytest.raises(ValueError, match="restore_threshold must be in"):
        planner_config(parse("--restore-threshold", "0.99"))


def test_pipeline_micro_batches_flag_reaches_the_scheduler_config(tmp_path) -> None:
    from coordinator.cli import engine_config

    assert engine_config(parse(), tmp_path).scheduler.pipeline_micro_batches is None
    args = parse("--pipeline-micro-batches", "1")
    assert engine_config(args, tmp_path).scheduler.pipeline_micro_batches == 1
    with pytest.raises(ValueError, match="pipeline_micro_batches must be >= 1"):
        engine_config(parse("--pipeline-micro-batches", "0"), tmp_path)


def test_pipeline_chunk_cost_flag_reaches_the_scheduler_config(tmp_path) -> None:
    from coordinator.cli import engine_config
    from workers.config import SchedulerConfig

    assert engine_config(parse(), tmp_path).scheduler.pipeline_chunk_cost == "tokens"
    args = parse("--pipeline-chunk-cost", "attention")
    assert engine_config(args, tmp_path).scheduler.pipeline_chunk_cost == "attention"
    with pytest.raises(ValueError, match="pipeline_chunk_cost must be one of tokens, attention"):
        SchedulerConfig(pipeline_chunk_cost="flops")


def test_serve_defaults_drop_and_its_engine_flags(tmp_path) -> None:
    """The overload policy defaults to drop; the live budget and the pipeline budget reach the
    engine config; stage graphs are captured at start-up only where a drop can happen."""
    args = parse("--kv-exchange-bytes-per-step", "4096", "--max-num-batched-tokens", "8192")
    assert args.overload_policy == "drop"
    engine = engine_config(args, tmp_path)
    assert engine.cache.kv_exchange_bytes_per_step == 4096
    assert engine_config(parse(), tmp_path).cache.kv_exchange_bytes_per_step is None
    assert engine.scheduler.pipeline_token_budget == PIPELINE_TOKENS == 1024
    assert engine_for_policy(engine, "drop", 2).stage_graphs_at_start == 2
    assert engine_for_policy(engine, "drop", 1).stage_graphs_at_start == 0
    assert engine_for_policy(engine, "recompute", 4).stage_graphs_at_start == 0
    with pytest.raises(ValueError, match="stage_graphs_at_start"):
        EngineConfig(model_path=str(tmp_path), stage_graphs_at_start=1)


def test_exchange_budget_is_set_or_25_ms_of_the_measured_link() -> None:
    assert exchange_bytes_per_step(4096, 300e9) == 4096
    assert exchange_bytes_per_step(0, 300e9) == 0  # one layer of one request a step
    assert exchange_bytes_per_step(None, 300e9) == int(300e9 * EXCHANGE_STEP_S) == 7_500_000_000
    assert exchange_bytes_per_step(None, 1e9) == 256 * 2**20  # a slow link: the floor
    assert exchange_bytes_per_step(None, None) == EXCHANGE_FALLBACK_BYTES == 2**30  # gloo
