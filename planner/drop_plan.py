"""Drop and restore plans: which instances merge, into how many stages, and what that yields.

Sources: KunServe drops whole layers in contiguous slices, stage r keeping layers
[r·L/g, (r+1)·L/g) (reference/kunserve.md §3(a), ``FlashBackend._step``); a drop frees
(g-1)/g of each member's layer weights, so the group's KV capacity grows by 1 + ((g-1)/g)·W/K
(§3(a), DESIGN.md §8); the paper plans "without unnecessary cooperation" with an O(N log N)
greedy (§0 item 1, §3(a)), whose exact rule was not available: the greedy here is ours.
Restore needs an empty queue and the live KV to fit back (§3(d); max_restore_memory_ratio,
§3(e)).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Collection, Sequence

from planner.config import PlannerConfig
from planner.cost_model import CostModel, rejection
from planner.types import DropPlan, Group, InstanceLoad, InstanceState, ModelShape, RestorePlan

logger = logging.getLogger(__name__)


def stage_layer_ranges(num_layers: int, g: int) -> list[tuple[int, int]]:
    """Decoder layers ``[start, end)`` of each of g stages, in order, tiling ``[0, num_layers)``.

    Stage r keeps layers [r·L/g, (r+1)·L/g) when g divides L (KunServe). Otherwise each stage
    gets floor(L/g) layers and the first L mod g stages one more, so the last stage, which also
    runs the final norm and LM head, is never the one with an extra layer. Stage 0 keeps the
    embedding; the last stage keeps the final norm and LM head.

    Raises ValueError unless 1 <= g <= num_layers.
    """
    if not 1 <= g <= num_layers:
        raise ValueError(f"group size g must be in [1, num_layers={num_layers}], got {g}")
    base, extra = divmod(num_layers, g)
    ranges, start = [], 0
    for r in range(g):
        end = start + base + (1 if r < extra else 0)
        ranges.append((start, end))
        start = end
    return ranges


def dropped_bytes(shape: ModelShape, ranges: Sequence[tuple[int, int]], stage: int) -> int:
    """Weight bytes stage ``stage`` of a group with these layer ranges frees (bytes): the layers
    outside its range, the embedding unless it needs it (stage 0, or the last when tied), the
    final norm and LM head unless it is the last stage."""
    last = len(ranges) - 1
    start, end = ranges[stage]
    keeps_embedding = stage == 0 or (shape.tie_word_embeddings and stage == last)
    nbytes = (shape.num_layers - (end - start)) * shape.layer_weight_bytes
    nbytes += 0 if keeps_embedding else shape.embedding_bytes
    nbytes += 0 if stage == last else shape.head_bytes
    return nbytes


def stage_capacity(
    shape: ModelShape, normal_blocks: int, ranges: Sequence[tuple[int, int]], stage: int
) -> tuple[int, int]:
    """(extra, total) stage blocks of one member after the drop.

    extra = dropped bytes // stage block bytes (the borrowed chunks, mapped at the end of the KV
    range); total = extra + the normal region re-read at the stage's layers per block,
    floor(normal_blocks · L / layers) (exact when the stage's layer count divides L).
    """
    start, end = ranges[stage]
    layers = end - start
    extra = dropped_bytes(shape, ranges, stage) // shape.stage_block_bytes(layers)
    return extra, normal_blocks * shape.num_layers // layers + extra


def kv_capacity_bound(shape: ModelShape, kv_bytes: int, g: int) -> float:
    """1 + ((g-1)/g)·W/K: a group's KV capacity multiplier from layer weights W (bytes) and a
    member's normal KV region K (bytes), ignoring embedding, head and block rounding
    (reference/kunserve.md §3(a); DESIGN.md §8)."""
    return 1.0 + (g - 1) / g * shape.layers_weight_bytes / kv_bytes


def is_overloaded(load: InstanceLoad, config: PlannerConfig) -> bool:
    """One sample's drop condition: demand >= drop_threshold and the queue needs at least the
    free blocks (KunServe oom_check, reference/kunserve.md §3(a))."""
    return load.demand_fraction >= config.drop_threshold and load.queue_needs_free_blocks


def plan_drop(
    loads: Sequence[InstanceLoad],
    shape: ModelShape,
    cost_model: CostModel,
    config: PlannerConfig,
    overloaded: Collection[int] | None = None,
) -> DropPlan | None:
    """Groups to form so that overloaded instances get KV memory; None when no group pays off.

    Greedy: normal instances sorted by pressure (KV demand over capacity; O(N log N)). Each
    overloaded one, most pressured first (ties: lower id), is a seed (the group's leader,
    stage 0); its partners are the least pressured instances not yet taken, since their spare
    KV joins the pool too; each seed costs at most max_group_size - 1 group evaluations. The group size is the smallest g in [2, max_group_size] whose group
    covers its demand (``Group.covers_demand``) and whose pipeline the cost model accepts
    (``cost_model.rejection``); if no accepted g covers, the largest accepted g (partial relief).

    ``overloaded``: instance ids the detector decided to drop; by default those whose latest
    load meets ``is_overloaded``.
    """
    normal = [ld for ld in loads if ld.state is InstanceState.NORMAL and ld.group_id is None]
    if overloaded is None:
        overloaded = {ld.instance_id for ld in normal if is_overloaded(ld, config)}
    by_pressure = sorted(normal, key=lambda ld: (ld.demand_fraction, ld.instance_id))
    seeds = sorted(
        (ld for ld in normal if ld.instance_id in overloaded),
        key=lambda ld: (-ld.demand_fraction, ld.instance_id),
    )
    taken: set[int] = set()
    groups = []
    for seed in seeds:
        if seed.instance_id in taken:
            continue
        if seed.step_token_fill > config.max_step_fill:
            logger.info(
                "no drop for instance %d: its steps fill %.0f%% of the token budget "
                "(compute-bound; max_step_fill %.2f)",
                seed.instance_id,
                100 * seed.step_token_fill,
                config.max_step_fill,
            )
            continue
        if seed.compute_use > config.max_compute_use:
            logger.info(
                "no drop for instance %d: it computes %.0f%% of its peak token rate "
                "(its queue waits for compute; max_compute_use %.2f)",
                seed.instance_id,
                100 * seed.compute_use,
                config.max_compute_use,
            )
            continue
        free = (ld for ld in by_pressure if ld.instance_id not in taken and ld is not seed)
        partners = list(itertools.islice(free, config.max_group_size - 1))
        group = _plan_group(seed, partners, shape, cost_model, config)
        if group is not None:
            groups.append(group)
            taken.update(group.instance_ids)
    return DropPlan(tuple(groups)) if groups else None


def _plan_group(
    seed: InstanceLoad,
    partners: Sequence[InstanceLoad],
    shape: ModelShape,
    cost_model: CostModel,
    config: PlannerConfig,
) -> Group | None:
    """Smallest accepted covering group around ``seed``; else the largest accepted one."""
    fallback = None
    for g in range(2, min(config.max_group_size, len(partners) + 1, shape.num_layers) + 1):
        group = evaluate_group([seed, *partners[: g - 1]], shape, cost_model, config)
        reason = rejection(group.estimate, config)
        if reason is not None:
            logger.debug("drop group %s rejected: %s", group.instance_ids, reason)
        elif group.covers_demand:
            return group
        else:
            fallback = group
    return fallback


def evaluate_group(
    members: Sequence[InstanceLoad],
    shape: ModelShape,
    cost_model: CostModel,
    config: PlannerConfig,
) -> Group:
    """Capacity, coverage and pipeline cost of merging ``members`` in this stage order."""
    ranges = stage_layer_ranges(shape.num_layers, len(members))
    caps = [stage_capacity(shape, m.kv_blocks_total, ranges, r) for r, m in enumerate(members)]
    capacity_after = min(total for _, total in caps)
    demand = sum(m.kv_demand_blocks for m in members)
    estimate = cost_model.estimate(
        [m.num_running for m in members],
        _admitted(members, capacity_after, config),
        [end - start for start, end in ranges],
    )
    return Group(
        instance_ids=tuple(m.instance_id for m in members),
        stage_layer_ranges=tuple(ranges),
        extra_blocks=tuple(extra for extra, _ in caps),
        stage_blocks=tuple(total for _, total in caps),
        capacity_before_blocks=sum(m.kv_blocks_total for m in members),
        capacity_after_blocks=capacity_after,
        demand_blocks=demand,
        covers_demand=demand <= config.plan_fill_target * capacity_after,
        estimate=estimate,
    )


def _admitted(members: Sequence[InstanceLoad], capacity_after: int, config: PlannerConfig) -> int:
    """Queued sequences the group admits at once: all of them if their blocks fit under
    plan_fill_target of the new capacity, else the same share of them as of their blocks."""
    waiting = sum(m.num_waiting for m in members)
    waiting_blocks = sum(m.waiting_demand_blocks for m in members)
    running_blocks = sum(m.kv_demand_blocks for m in members) - waiting_blocks
    room = config.plan_fill_target * capacity_after - running_blocks
    if waiting_blocks <= room:
        return waiting
    return int(waiting * max(0.0, room) / waiting_blocks)


def plan_restore(
    group_loads: Sequence[InstanceLoad],
    shape: ModelShape,
    config: PlannerConfig,
    cost_model: CostModel | None = None,
) -> RestorePlan | None:
    """Split one pipelined group back into full instances, or None when it must not yet.

    None while any member's queue is non-empty or while the group's live KV demand exceeds
    restore_fill_limit of the members' summed normal capacity (the aggregate check; the executor
    picks each request's home and must fit it there). Raises ValueError unless all loads are
    pipelined members of one group whose layer ranges tile [0, L).
    """
    members = _group_members(group_loads, shape)
    if any(m.num_waiting for m in members):
        return None
    normal = tuple(m.kv_blocks_total for m in members)
    limit = int(config.restore_fill_limit * sum(normal))
    demand = sum(m.kv_demand_blocks for m in members)
    if demand > limit:
        return None
    ranges = [m.layer_range for m in members]
    refill = tuple(dropped_bytes(shape, ranges, r) for r in range(len(members)))
    return RestorePlan(
        group_id=members[0].group_id,
        instance_ids=tuple(m.instance_id for m in members),
        live_demand_blocks=demand,
        normal_capacity_blocks=normal,
        capacity_limit_blocks=limit,
        refill_bytes=refill,
        expected_refill_s=None
        if cost_model is None
        else max(cost_model.refill_time(b) for b in refill),
    )


def _group_members(loads: Sequence[InstanceLoad], shape: ModelShape) -> list[InstanceLoad]:
    """The loads in stage order, after checking they form one pipelined group."""
    if not loads:
        raise ValueError("plan_restore needs the group's loads, got none")
    group_ids = {ld.group_id for ld in loads}
    if len(group_ids) != 1 or any(ld.state is not InstanceState.PIPELINED for ld in loads):
        raise ValueError(f"plan_restore needs pipelined members of one group, got {group_ids}")
    if any(ld.layer_range is None for ld in loads):
        raise ValueError("every pipelined member needs its layer_range")
    members = sorted(loads, key=lambda ld: ld.layer_range)
    ends = [0] + [ld.layer_range[1] for ld in members]
    if [ld.layer_range[0] for ld in members] != ends[:-1] or ends[-1] != shape.num_layers:
        raise ValueError(
            f"layer ranges {[ld.layer_range for ld in members]} do not tile [0, {shape.num_layers})"
        )
    return members
