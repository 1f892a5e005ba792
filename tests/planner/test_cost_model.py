"""Step-time interpolation, pipeline cycle and plan rejection."""

from __future__ import annotations

import pytest

from planner.config import PlannerConfig
from planner.cost_model import CostModel, StepProfile, rejection
from planner.types import ModelShape, PipelineEstimate

SHAPE = ModelShape(
    num_layers=32,
    layer_weight_bytes=1,
    kv_bytes_per_token_per_layer=1,
    block_size=16,
    hidden_bytes_per_token=1000,
)


def bilinear(n: int, b: float) -> float:
    """Affine in layers and batch with a cross term: interpolation reproduces it exactly."""
    return 1e-3 + 2e-4 * n + 1e-5 * b + 3e-6 * n * b


def make_model(
    layers: tuple[int, ...] = (8, 32),
    batches: tuple[int, ...] = (1, 64, 256),
    latency: float = 0.0,
) -> CostModel:
    points = {(n, b): bilinear(n, b) for n in layers for b in batches}
    profile = StepProfile(decode=points, link_bandwidth_bytes_per_s=1e9, link_latency_s=latency)
    return CostModel(profile, SHAPE)


@pytest.mark.parametrize(("layers", "batch"), [(8, 64), (16, 32), (24, 100), (32, 200)])
def test_interpolates_between_profiled_points(layers: int, batch: int) -> None:
    assert make_model().step_time("decode", batch, layers) == pytest.approx(bilinear(layers, batch))


def test_extrapolates_along_the_last_segments() -> None:
    model = make_model()
    assert model.step_time("decode", 512, 32) == pytest.approx(bilinear(32, 512))
    assert model.step_time("decode", 64, 4) == pytest.approx(bilinear(4, 64))
    assert model.step_time("decode", 64, 48) == pytest.approx(bilinear(48, 64))


def test_small_batches_cost_the_smallest_profiled_batch() -> None:
    model = make_model(batches=(4, 64))
    assert model.step_time("decode", 1, 8) == pytest.approx(bilinear(8, 4))
    assert model.step_time("decode", 0, 8) == pytest.approx(bilinear(8, 4))


def test_one_profiled_layer_count_scales_with_layers() -> None:
    model = make_model(layers=(32,))
    assert model.step_time("decode", 64, 16) == pytest.approx(bilinear(32, 64) / 2)


def test_prefill_needs_its_own_profile() -> None:
    with pytest.raises(ValueError, match="phase 'prefill' has no profile"):
        make_model().step_time("prefill", 512, 32)
    profile = StepProfile(
        decode={(32, 1): 1e-3},
        prefill={(32, 512): 0.05, (32, 2048): 0.2},
        link_bandwidth_bytes_per_s=1e9,
    )
    assert CostModel(profile, SHAPE).step_time("prefill", 1024, 32) == pytest.approx(0.1)


def test_pipeline_cycle_is_g_times_the_slowest_stage() -> None:
    model = make_model(latency=10e-6)
    cycle, bubble = model.pipeline_cycle("decode", 100, [11, 11, 10])
    send = 10e-6 + 34 * 1000 / 1e9  # ceil(100 / 3) = 34 sequences' hidden states
    first, last = bilinear(11, 34) + send, bilinear(10, 34) + 10e-6
    assert cycle == pytest.approx(3 * first)
    assert bubble == pytest.approx(1 - (2 * first + last) / (3 * first))


def test_estimate_compares_before_and_after() -> None:
    model = make_model()
    est = model.estimate(running=[100, 20], admitted=40, stage_layers=[16, 16])
    assert est.tbt_before_s == pytest.approx(bilinear(32, 100))
    assert est.throughput_before == pytest.approx(100 / bilinear(32, 100) + 20 / bilinear(32, 20))
    assert est.tbt_unpipelined_s == pytest.approx(bilinear(32, 80))
    assert est.tbt_after_s == pytest.approx(2 * (bilinear(16, 80) + 80 * 1000 / 1e9))
    assert est.throughput_after == pytest.approx(160 / est.tbt_after_s)
    assert est.admitted == 40


def _estimate(**overrides: float) -> PipelineEstimate:
    fields = dict(
        tbt_before_s=0.010,
        tbt_unpipelined_s=0.010,
        tbt_after_s=0.011,
        throughput_before=10_000.0,
        throughput_after=12_000.0,
        bubble_fraction=0.0,
        admitted=10,
    )
    fields.update(overrides)
    return PipelineEstimate(**fields)


def test_rejection_reasons() -> None:
    config = PlannerConfig()
    assert rejection(_estimate(), config) is None
    assert _estimate().step_time_overhead == pytest.approx(0.1)
    assert rejection(_estimate(admitted=0), config) == "admits no queued request"
    assert rejection(_estimate(tbt_after_s=0.016), config) == "TBT 16.00 ms exceeds 15.00 ms"
    assert (
        rejection(_estimate(throughput_after=8_900.0), config)
        == "throughput 8900 tok/s is below 9000 tok/s"
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(decode={}), "needs at least one"),
        (dict(decode={(0, 1): 1e-3}), "must be >= 1"),
        (dict(decode={(32, 1): 0.0}), "finite time > 0"),
        (dict(decode={(32, 1): 1e-3}, link_bandwidth_bytes_per_s=0.0), "link_bandwidth"),
        (dict(decode={(32, 1): 1e-3}, link_latency_s=-1.0), "link_latency_s"),
        (dict(decode={(32, 1): 1e-3}, prefill={(32, 8): float("nan")}), r"prefill\[\(32, 8\)\]"),
    ],
)
def test_profile_validation(kwargs: dict, match: str) -> None:
    kwargs.setdefault("link_bandwidth_bytes_per_s", 1e9)
    with pytest.raises(ValueError, match=match):
        StepProfile(**kwargs)


def test_noisy_profiles_never_extrapolate_to_zero() -> None:
    """Times measured out of order (noise) are floored outside the profiled range."""
    profile = StepProfile(
        decode={(16, 1): 3e-3, (32, 1): 2e-3, (32, 64): 1e-3},
        link_bandwidth_bytes_per_s=1e9,
    )
    model = CostModel(profile, SHAPE)
    assert model.step_time("decode", 1, 64) == pytest.approx(2e-3)  # the most layers' time
    assert model.step_time("decode", 1024, 32) == pytest.approx(1e-3)  # the largest batch's
    assert model.step_time("decode", 1, 4) == pytest.approx(3.75e-3)  # along 16 -> 32
