"""PlannerConfig defaults and validation; the load and shape types' checks."""

from __future__ import annotations

import ast
import dataclasses
import inspect

import pytest

from planner.config import PlannerConfig
from planner.types import InstanceLoad, InstanceState, ModelShape


def test_defaults_are_kunserves() -> None:
    config = PlannerConfig()
    assert (config.drop_threshold, config.restore_threshold) == (0.95, 0.5)
    assert (config.sample_interval_s, config.window_s) == (0.5, 15.0)  # 30 samples
    assert config.restore_fill_limit == 0.8


def test_every_field_has_a_docstring() -> None:
    """The docstrings double as CLI help (coordinator.cli.field_docs reads them)."""
    body = ast.parse(inspect.getsource(PlannerConfig)).body[0].body
    documented = [
        prev.target.id
        for prev, node in zip(body, body[1:], strict=False)
        if isinstance(prev, ast.AnnAssign)
        and isinstance(node, ast.Expr)
        and isinstance(node.value.value, str)
    ]
    assert documented == [f.name for f in dataclasses.fields(PlannerConfig)]


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("drop_threshold", 0.0),
        ("drop_threshold", float("nan")),
        ("restore_threshold", 0.0),
        ("restore_threshold", 0.95),
        ("sample_interval_s", 0.0),
        ("window_s", 0.5),
        ("smoothing_s", 0.25),
        ("smoothing_s", 20.0),
        ("min_dwell_s", -1.0),
        ("min_dwell_s", 16.0),
        ("cooldown_s", -1.0),
        ("cooldown_s", "10"),
        ("at_once_check_s", -0.05),
        ("max_group_size", 1),
        ("max_group_size", 2.5),
        ("plan_fill_target", 0.0),
        ("plan_fill_target", 1.5),
        ("restore_fill_limit", 1.01),
        ("max_tbt_slowdown", 0.9),
        ("min_throughput_ratio", 0.0),
        ("min_throughput_ratio", True),
    ],
)
def test_invalid_values_name_the_field(name: str, value: object) -> None:
    with pytest.raises(ValueError, match=rf"^PlannerConfig\.{name} must be"):
        PlannerConfig(**{name: value})


def test_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        PlannerConfig().drop_threshold = 0.9  # type: ignore[misc]


def test_load_properties() -> None:
    load = InstanceLoad(0, 1000, 980, 1100, num_waiting=3, waiting_demand_blocks=120)
    assert (load.free_blocks, load.demand_fraction) == (20, 1.1)
    assert load.queue_needs_free_blocks
    assert not InstanceLoad(0, 1000, 900, 960, 1, 60).queue_needs_free_blocks  # 60 < 100 free
    assert not InstanceLoad(0, 1000, 1000, 1000).queue_needs_free_blocks  # nothing waits


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(kv_blocks_total=0), "kv_blocks_total must be >= 1"),
        (dict(num_waiting=-1), "num_waiting must be >= 0"),
        (dict(waiting_demand_blocks=101), r"waiting_demand_blocks must be in \[0, "),
        (dict(state=InstanceState.PIPELINED), "pipelined but has no group_id"),
    ],
)
def test_load_validation(kwargs: dict, match: str) -> None:
    fields = dict(instance_id=0, kv_blocks_total=1000, kv_blocks_used=0, kv_demand_blocks=100)
    fields.update(kwargs)
    with pytest.raises(ValueError, match=match):
        InstanceLoad(**fields)


def test_shape_validation() -> None:
    with pytest.raises(ValueError, match="ModelShape.num_layers must be >= 1"):
        ModelShape(0, 1, 1, 16)
    with pytest.raises(ValueError, match="ModelShape.head_bytes must be >= 0"):
        ModelShape(32, 1, 1, 16, head_bytes=-1)
