"""Stage ranges, freed memory, drop plans and restore plans, with exact values."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from planner.config import PlannerConfig
from planner.cost_model import CostModel, StepProfile
from planner.drop_plan import (
    dropped_bytes,
    kv_capacity_bound,
    plan_drop,
    plan_restore,
    stage_capacity,
    stage_layer_ranges,
)
from planner.types import InstanceLoad, InstanceState, ModelShape

MakeLoad = Callable[..., InstanceLoad]
CONFIG = PlannerConfig()
KV_BLOCKS = 25_600  # 50 GiB of 2 MiB blocks


def test_stage_ranges_even_split_is_kunserves() -> None:
    assert stage_layer_ranges(32, 2) == [(0, 16), (16, 32)]
    assert stage_layer_ranges(32, 4) == [(0, 8), (8, 16), (16, 24), (24, 32)]
    assert stage_layer_ranges(32, 1) == [(0, 32)]


def test_stage_ranges_remainder_goes_to_the_first_stages() -> None:
    assert stage_layer_ranges(30, 4) == [(0, 8), (8, 16), (16, 23), (23, 30)]
    assert stage_layer_ranges(7, 3) == [(0, 3), (3, 5), (5, 7)]


@pytest.mark.parametrize("g", [0, 33, -1])
def test_stage_ranges_reject_impossible_group_sizes(g: int) -> None:
    with pytest.raises(ValueError, match="group size g"):
        stage_layer_ranges(32, g)


def test_llama3_8b_shape(llama3_8b: ModelShape) -> None:
    assert llama3_8b.layer_weight_bytes == 436_224_000
    assert llama3_8b.layers_weight_bytes == 13_959_168_000  # W, ~14 GB
    assert llama3_8b.kv_bytes_per_token_per_layer == 4096
    assert llama3_8b.full_block_bytes == 2 * 1024 * 1024
    assert llama3_8b.stage_block_bytes(16) == 1024 * 1024
    assert llama3_8b.embedding_bytes == 1_050_673_152
    assert llama3_8b.head_bytes == 1_050_673_152 + 8192  # LM head + final norm


def test_dropped_bytes_count_layers_embedding_and_head(llama3_8b: ModelShape) -> None:
    ranges = stage_layer_ranges(32, 2)
    layers = 16 * 436_224_000
    assert dropped_bytes(llama3_8b, ranges, 0) == layers + 1_050_681_344  # keeps the embedding
    assert dropped_bytes(llama3_8b, ranges, 1) == layers + 1_050_673_152  # keeps norm + head
    middle = stage_layer_ranges(32, 4)
    assert dropped_bytes(llama3_8b, middle, 1) == 24 * 436_224_000 + 1_050_673_152 + 1_050_681_344


def test_tied_embedding_stays_on_first_and_last_stage() -> None:
    shape = ModelShape(10, 100, 1, 1, embedding_bytes=50, head_bytes=2, tie_word_embeddings=True)
    ranges = stage_layer_ranges(10, 3)  # 4, 3, 3 layers
    assert [dropped_bytes(shape, ranges, r) for r in range(3)] == [602, 752, 700]


def test_capacity_multiplier_meets_the_bound_for_llama3_8b(llama3_8b: ModelShape) -> None:
    """Layers only: 1 + ((g-1)/g)·W/K minus under one block of rounding per group."""
    layers_only = ModelShape(32, 436_224_000, 4096, 16)
    k = KV_BLOCKS * layers_only.full_block_bytes
    ranges = stage_layer_ranges(32, 2)
    caps = [stage_capacity(layers_only, KV_BLOCKS, ranges, r) for r in range(2)]
    # 16 layers = 6,979,584,000 bytes; a 16-layer block = 1 MiB -> 6656 extra stage blocks;
    # the 2 MiB normal blocks re-read as 51,200 one-MiB blocks.
    assert caps == [(6656, 57_856), (6656, 57_856)]
    multiplier = 57_856 / (2 * KV_BLOCKS)
    bound = kv_capacity_bound(layers_only, k, 2)
    assert bound == pytest.approx(1 + 0.5 * 13_959_168_000 / k)
    assert bound - 1 / KV_BLOCKS < multiplier <= bound
    assert multiplier >= 0.95 * bound  # DESIGN.md §8 target
    # With the embedding and head dropped too, each stage gains 1 GB more than the bound counts.
    full = [stage_capacity(llama3_8b, KV_BLOCKS, ranges, r) for r in range(2)]
    assert full == [(7658, 58_858), (7658, 58_858)]


def test_capacity_with_uneven_stages_is_the_smallest_stage() -> None:
    shape = ModelShape(30, 1000, 10, 1)  # stage block bytes = 10 per layer
    ranges = stage_layer_ranges(30, 4)  # 8, 8, 7, 7 layers
    caps = [stage_capacity(shape, 100, ranges, r) for r in range(4)]
    # extra = 22000 // 80 and 23000 // 70; base = 100 * 30 // 8 and // 7
    assert caps == [(275, 650), (275, 650), (328, 756), (328, 756)]


def test_plan_pairs_the_hot_instance_with_the_coldest(
    make_load: MakeLoad,
    llama3_8b: ModelShape,
    cost_model: CostModel,
    decode_seconds: Callable[[int, int], float],
) -> None:
    loads = [make_load(0, 1.1), make_load(1, 0.3), make_load(2, 0.5), make_load(3, 0.2)]
    assert (loads[0].num_running, loads[0].num_waiting, loads[3].num_running) == (200, 20, 40)
    plan = plan_drop(loads, llama3_8b, cost_model, CONFIG)
    assert plan is not None and len(plan.groups) == 1
    group = plan.groups[0]
    assert group.instance_ids == (0, 3) and group.g == 2 and group.leader == 0
    assert group.stage_layer_ranges == ((0, 16), (16, 32))
    assert group.extra_blocks == (7658, 7658)
    assert (group.capacity_before_blocks, group.capacity_after_blocks) == (51_200, 58_858)
    assert group.demand_blocks == 28_160 + 5_120
    assert group.covers_demand
    est = group.estimate
    assert est.admitted == 20
    send = 20e-6 + 130 * 8192 / 350e9  # 130-sequence micro-batch's hidden states
    assert est.tbt_after_s == pytest.approx(2 * (decode_seconds(16, 130) + send))
    assert est.tbt_unpipelined_s == pytest.approx(decode_seconds(32, 130))
    assert est.throughput_before == pytest.approx(
        200 / decode_seconds(32, 200) + 40 / decode_seconds(32, 40)
    )
    assert est.throughput_after == pytest.approx(260 / est.tbt_after_s)
    assert est.step_time_overhead == pytest.approx(est.tbt_after_s / decode_seconds(32, 130) - 1)


def test_plan_takes_the_smallest_group_that_covers() -> None:
    shape = ModelShape(32, 300, 1, 1)  # full block 32 bytes: K = 32000, W = 9600 per GPU
    profile = StepProfile(
        decode={(n, b): 0.2e-3 + n * 1e-4 for n in (8, 32) for b in (1, 256)},
        link_bandwidth_bytes_per_s=1e12,
    )
    loads = [
        InstanceLoad(0, 1000, 1000, 1500, 40, 500, num_running=60),
        InstanceLoad(1, 1000, 700, 700, num_running=50),
        InstanceLoad(2, 1000, 600, 600, num_running=50),
        InstanceLoad(3, 1000, 800, 800, num_running=50),
    ]
    plan = plan_drop(loads, shape, CostModel(profile, shape), CONFIG)
    assert plan is not None
    (group,) = plan.groups
    # g=2 with instance 2: capacity 2300, demand 2100 > 0.9 * 2300; g=3 adds instance 1:
    # stages of 11, 11, 10 layers hold 2909 + 572, 2909 + 572, 3200 + 660 blocks -> 3481.
    assert group.instance_ids == (0, 2, 1)
    assert group.stage_blocks == (3481, 3481, 3860)
    assert group.covers_demand and group.demand_blocks == 2800


def test_each_hot_instance_gets_its_own_partner(
    make_load: MakeLoad, llama3_8b: ModelShape, cost_model: CostModel
) -> None:
    loads = [make_load(0, 1.2), make_load(1, 1.1), make_load(2, 0.2), make_load(3, 0.3)]
    plan = plan_drop(loads, llama3_8b, cost_model, CONFIG)
    assert plan is not None
    assert [grp.instance_ids for grp in plan.groups] == [(0, 2), (1, 3)]
    assert plan.instance_ids == (0, 2, 1, 3)


def test_two_hot_instances_get_partial_relief(
    make_load: MakeLoad, llama3_8b: ModelShape, cost_model: CostModel
) -> None:
    """Two GPUs in a burst: g=2 cannot cover 2.15x of one GPU's KV, but it admits 13 of the
    30 queued requests at 3.6% TBT overhead, so the plan is the best effort."""
    loads = [make_load(0, 1.1), make_load(1, 1.05)]
    plan = plan_drop(loads, llama3_8b, cost_model, CONFIG)
    assert plan is not None
    (group,) = plan.groups
    assert group.instance_ids == (0, 1) and not group.covers_demand
    assert group.estimate.admitted == 13  # 30 * (0.9 * 58858 - 51200) / 3840 blocks
    assert group.estimate.step_time_overhead == pytest.approx(0.03595, abs=1e-5)


def test_no_plan_when_the_pipeline_costs_too_much(
    make_load: MakeLoad, llama3_8b: ModelShape
) -> None:
    slow_link = StepProfile(
        decode={(32, 1): 5e-3, (32, 256): 15e-3, (16, 1): 3e-3, (16, 256): 8e-3},
        link_bandwidth_bytes_per_s=1e9,
        link_latency_s=10e-3,
    )
    loads = [make_load(0, 1.1), make_load(1, 0.2)]
    assert plan_drop(loads, llama3_8b, CostModel(slow_link, llama3_8b), CONFIG) is None


def test_no_plan_without_overload_or_partners(
    make_load: MakeLoad, llama3_8b: ModelShape, cost_model: CostModel
) -> None:
    assert plan_drop([make_load(0, 0.9), make_load(1, 0.2)], llama3_8b, cost_model, CONFIG) is None
    assert plan_drop([make_load(0, 1.1)], llama3_8b, cost_model, CONFIG) is None
    busy = make_load(1, 0.2, state=InstanceState.RESTORING)
    assert plan_drop([make_load(0, 1.1), busy], llama3_8b, cost_model, CONFIG) is None


def test_plan_follows_the_detectors_choice(
    make_load: MakeLoad, llama3_8b: ModelShape, cost_model: CostModel
) -> None:
    loads = [make_load(0, 1.1), make_load(1, 1.2), make_load(2, 0.2)]
    plan = plan_drop(loads, llama3_8b, cost_model, CONFIG, overloaded={0})
    assert plan is not None and [grp.instance_ids for grp in plan.groups] == [(0, 2)]


def _member(i: int, layers: tuple[int, int], demand: int, waiting: int = 0) -> InstanceLoad:
    return InstanceLoad(
        instance_id=i,
        kv_blocks_total=1000,
        kv_blocks_used=demand,
        kv_demand_blocks=demand,
        num_waiting=waiting,
        waiting_demand_blocks=min(demand, waiting),
        state=InstanceState.PIPELINED,
        layer_range=layers,
        group_id=7,
    )


def test_restore_plan_states_its_capacity_check(
    llama3_8b: ModelShape, cost_model: CostModel
) -> None:
    members = [_member(5, (16, 32), 0), _member(4, (0, 16), 1500)]
    plan = plan_restore(members, llama3_8b, CONFIG, cost_model)
    assert plan is not None
    assert plan.group_id == 7 and plan.instance_ids == (4, 5)  # stage order
    assert plan.live_demand_blocks == 1500
    assert plan.normal_capacity_blocks == (1000, 1000)
    assert plan.capacity_limit_blocks == 1600
    assert plan.refill_bytes == (8_030_265_344, 8_030_257_152)
    assert plan.expected_refill_s == pytest.approx(20e-6 + 8_030_265_344 / 350e9)
    assert plan_restore(members, llama3_8b, CONFIG).expected_refill_s is None


def test_no_restore_while_live_kv_does_not_fit_or_queue_waits(llama3_8b: ModelShape) -> None:
    too_full = [_member(0, (0, 16), 1601), _member(1, (16, 32), 0)]
    assert plan_restore(too_full, llama3_8b, CONFIG) is None
    queued = [_member(0, (0, 16), 100, waiting=1), _member(1, (16, 32), 0)]
    assert plan_restore(queued, llama3_8b, CONFIG) is None


def test_restore_rejects_loads_that_are_not_one_group(llama3_8b: ModelShape) -> None:
    with pytest.raises(ValueError, match="needs the group's loads"):
        plan_restore([], llama3_8b, CONFIG)
    gap = [_member(0, (0, 15), 0), _member(1, (16, 32), 0)]
    with pytest.raises(ValueError, match="do not tile"):
        plan_restore(gap, llama3_8b, CONFIG)
    normal = InstanceLoad(2, 1000, 0, 0)
    with pytest.raises(ValueError, match="pipelined members of one group"):
        plan_restore([_member(0, (0, 16), 0), normal], llama3_8b, CONFIG)


def test_no_drop_for_a_compute_bound_instance(
    make_load: MakeLoad, llama3_8b: ModelShape, cost_model: CostModel
) -> None:
    """A prefill burst fills every step's token budget: more KV would not add throughput, so
    the hot instance gets no group (its partner could still seed one of its own)."""

    def loads(fill: float) -> list[InstanceLoad]:
        return [make_load(0, 1.1, step_token_fill=fill), make_load(3, 0.2)]

    assert plan_drop(loads(0.95), llama3_8b, cost_model, CONFIG) is None
    plan = plan_drop(loads(0.9), llama3_8b, cost_model, CONFIG)  # at the limit: drops
    assert plan is not None and plan.groups[0].instance_ids == (0, 3)
    off = PlannerConfig(max_step_fill=1.0)
    assert plan_drop(loads(1.0), llama3_8b, cost_model, off) is not None
    with pytest.raises(ValueError, match="max_step_fill"):
        PlannerConfig(max_step_fill=0)
    with pytest.raises(ValueError, match="step_token_fill"):
        make_load(0, 0.5, step_token_fill=1.5)


def test_no_drop_for_an_instance_short_of_compute(
    make_load: MakeLoad, llama3_8b: ModelShape, cost_model: CostModel
) -> None:
    """An instance computing most of its peak token rate waits for compute, not KV: no group
    for it; at the limit, or with the guard off, it drops."""

    def loads(use: float) -> list[InstanceLoad]:
        return [make_load(0, 1.1, compute_use=use), make_load(3, 0.2)]

    assert plan_drop(loads(0.75), llama3_8b, cost_model, CONFIG) is None
    plan = plan_drop(loads(0.6), llama3_8b, cost_model, CONFIG)
    assert plan is not None and plan.groups[0].instance_ids == (0, 3)
    off = PlannerConfig(max_compute_use=2.0)
    assert plan_drop(loads(1.2), llama3_8b, cost_model, off) is not None
    with pytest.raises(ValueError, match="max_compute_use"):
        PlannerConfig(max_compute_use=0)
    with pytest.raises(ValueError, match="compute_use"):
        make_load(0, 0.5, compute_use=-0.1)
