"""Small types the planner shares with its callers: loads in, plans out.

Pure Python; the coordinator builds these from its own state (``EngineStats``, ``ModelConfig``).

Block units. Every block count in ``InstanceLoad`` and in a plan's demand or capacity is in
**full-model blocks**: ``block_size`` tokens of K and V for all ``num_layers`` layers
(``ModelShape.full_block_bytes``), i.e. ``ceil(tokens / block_size)`` per request. A pipeline
stage's own blocks hold only its layers (DESIGN.md §5); those are called **stage blocks**
(``ModelShape.stage_block_bytes``) and appear only where a field says so.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class InstanceState(enum.Enum):
    """Serving mode of one instance (the coordinator's state machine uses this type)."""

    STARTING = "starting"
    NORMAL = "normal"
    DROPPING = "dropping"
    PIPELINED = "pipelined"
    RESTORING = "restoring"
    FAILED = "failed"


@dataclass(frozen=True)
class InstanceLoad:
    """One instance's load at one sample (DESIGN.md §6.1; KunServe get_gpu_blocks_usage,
    reference/kunserve.md §3(a)). Block counts are full-model blocks (module docstring).

    A member of a pipelined group reports its **normal** capacity in ``kv_blocks_total`` (its
    own KV region, not the chunks borrowed from dropped weights), and the group's demand may sit
    on any member (typically the leader, whose scheduler holds every request): the detector and
    ``plan_restore`` sum the members.
    """

    instance_id: int
    kv_blocks_total: int
    """KV capacity in normal mode (blocks)."""
    kv_blocks_used: int
    """Blocks held by running requests now."""
    kv_demand_blocks: int
    """Blocks that running and waiting requests need for the tokens they hold now."""
    num_waiting: int = 0
    """Requests queued (not yet admitted or preempted)."""
    waiting_demand_blocks: int = 0
    """The part of ``kv_demand_blocks`` that the waiting requests need (blocks)."""
    num_running: int = 0
    """Requests decoding or prefilling now (the decode batch the cost model prices)."""
    state: InstanceState = InstanceState.NORMAL
    layer_range: tuple[int, int] | None = None
    """Decoder layers ``[start, end)`` the instance holds; ``None`` means all of them."""
    group_id: int | None = None
    """Pipeline group the instance belongs to; ``None`` in normal mode."""
    step_token_fill: float = 0.0
    """Share of the step token budget its recent steps used (0..1; EngineStats)."""
    compute_use: float = 0.0
    """Tokens it computed per second over recent samples over its profiled peak (>= 0; 0 when
    no profile)."""

    def __post_init__(self) -> None:
        if self.kv_blocks_total < 1:
            raise ValueError(f"kv_blocks_total must be >= 1, got {self.kv_blocks_total}")
        for name in ("kv_blocks_used", "kv_demand_blocks", "num_waiting", "num_running"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.compute_use >= 0:
            raise ValueError(f"compute_use must be >= 0, got {self.compute_use}")
        if not 0 <= self.step_token_fill <= 1:
            raise ValueError(f"step_token_fill must be in [0, 1], got {self.step_token_fill}")
        if not 0 <= self.waiting_demand_blocks <= self.kv_demand_blocks:
            raise ValueError(
                f"waiting_demand_blocks must be in [0, kv_demand_blocks={self.kv_demand_blocks}], "
                f"got {self.waiting_demand_blocks}"
            )
        if self.state is InstanceState.PIPELINED and self.group_id is None:
            raise ValueError(f"instance {self.instance_id} is pipelined but has no group_id")

    @property
    def free_blocks(self) -> int:
        """Blocks not held by running requests (may be 0, never negative)."""
        return max(0, self.kv_blocks_total - self.kv_blocks_used)

    @property
    def demand_fraction(self) -> float:
        """KV demand over normal capacity; above 1.0 when the queue holds more than fits."""
        return self.kv_demand_blocks / self.kv_blocks_total

    @property
    def queue_needs_free_blocks(self) -> bool:
        """A non-empty queue needs at least the free blocks (KunServe free_blocks_overflow,
        reference/kunserve.md §3(a))."""
        return self.num_waiting > 0 and self.waiting_demand_blocks >= self.free_blocks


@dataclass(frozen=True)
class ModelShape:
    """The byte sizes the planner needs, per GPU (a tensor-parallel shard counts its share)."""

    num_layers: int
    """Decoder layers L."""
    layer_weight_bytes: int
    """Bytes one decoder layer's weights occupy in the weight range (chunk-aligned if the
    parameter store aligns them; those are the bytes a drop frees)."""
    kv_bytes_per_token_per_layer: int
    """K and V bytes of one token in one layer: 2 * num_kv_heads * head_dim * dtype bytes."""
    block_size: int
    """Tokens per KV block (the cache's, carried here so byte/block arithmetic takes one
    argument)."""
    embedding_bytes: int = 0
    """Token embedding bytes; kept by stage 0 only (and by the last stage when tied)."""
    head_bytes: int = 0
    """Final norm plus LM head bytes (norm only when tied); kept by the last stage only."""
    hidden_bytes_per_token: int = 0
    """Activation bytes one token sends across a stage boundary: hidden_size * dtype bytes."""
    tie_word_embeddings: bool = False
    """The LM head is the embedding matrix, so the last stage keeps the embedding too."""

    def __post_init__(self) -> None:
        for name in ("num_layers", "layer_weight_bytes", "kv_bytes_per_token_per_layer"):
            if getattr(self, name) < 1:
                raise ValueError(f"ModelShape.{name} must be >= 1, got {getattr(self, name)}")
        if self.block_size < 1:
            raise ValueError(f"ModelShape.block_size must be >= 1, got {self.block_size}")
        for name in ("embedding_bytes", "head_bytes", "hidden_bytes_per_token"):
            if getattr(self, name) < 0:
                raise ValueError(f"ModelShape.{name} must be >= 0, got {getattr(self, name)}")

    @property
    def layers_weight_bytes(self) -> int:
        """W: all decoder layers' weight bytes (no embedding or head)."""
        return self.num_layers * self.layer_weight_bytes

    @property
    def full_block_bytes(self) -> int:
        """Bytes of one normal-mode block: block_size tokens of all L layers."""
        return self.stage_block_bytes(self.num_layers)

    def stage_block_bytes(self, num_layers: int) -> int:
        """Bytes of one block of a stage holding ``num_layers`` layers."""
        return self.block_size * self.kv_bytes_per_token_per_layer * num_layers

    @classmethod
    def from_dims(
        cls,
        *,
        num_layers: int,
        hidden_size: int,
        intermediate_size: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        vocab_size: int,
        dtype_bytes: int,
        block_size: int,
        tie_word_embeddings: bool = False,
    ) -> ModelShape:
        """Llama-family shape (RMSNorm, GQA, SwiGLU; no biases), unaligned byte counts.

        Per layer: q, k, v, o projections, gate/up/down, two RMSNorm weights, as
        ``workers.config.ModelConfig.weight_bytes`` counts them.
        """
        h, q, kv = hidden_size, num_heads * head_dim, num_kv_heads * head_dim
        per_layer = h * (q + 2 * kv) + q * h + 3 * h * intermediate_size + 2 * h
        embedding = vocab_size * h * dtype_bytes
        return cls(
            num_layers=num_layers,
            layer_weight_bytes=per_layer * dtype_bytes,
            kv_bytes_per_token_per_layer=2 * kv * dtype_bytes,
            block_size=block_size,
            embedding_bytes=embedding,
            head_bytes=h * dtype_bytes + (0 if tie_word_embeddings else embedding),
            hidden_bytes_per_token=h * dtype_bytes,
            tie_word_embeddings=tie_word_embeddings,
        )


@dataclass(frozen=True)
class PipelineEstimate:
    """The cost model's prediction for one group (planner/cost_model.py). Seconds and tokens/s."""

    tbt_before_s: float
    """Decode step time now: the slowest member's running batch on its full model."""
    tbt_unpipelined_s: float
    """Decode step time of the post-drop batch split evenly over g full-model instances."""
    tbt_after_s: float
    """Pipeline decode cycle: g micro-batches through the slowest stage plus its send."""
    throughput_before: float
    """Decode tokens per second of the members' running batches now."""
    throughput_after: float
    """Decode tokens per second of the pipeline with the admitted queue."""
    bubble_fraction: float
    """Share of stage time idle per cycle because stages differ (0 when balanced)."""
    admitted: int
    """Queued sequences the group admits at once after the drop."""

    @property
    def step_time_overhead(self) -> float:
        """Pipeline cost as a fraction: tbt_after / tbt_unpipelined - 1."""
        return self.tbt_after_s / self.tbt_unpipelined_s - 1.0


@dataclass(frozen=True)
class Group:
    """Instances merged into one g-stage pipeline. Member i is stage i; stage 0 is the leader."""

    instance_ids: tuple[int, ...]
    stage_layer_ranges: tuple[tuple[int, int], ...]
    """Decoder layers ``[start, end)`` each member keeps, in stage order."""
    extra_blocks: tuple[int, ...]
    """Stage blocks each member gains from its dropped weights' bytes."""
    stage_blocks: tuple[int, ...]
    """Each member's whole KV capacity after the drop, in its own stage blocks."""
    capacity_before_blocks: int
    """Members' normal KV capacity, summed (full-model blocks)."""
    capacity_after_blocks: int
    """Group capacity after the drop (full-model blocks = min over stages of stage blocks)."""
    demand_blocks: int
    """Members' KV demand (running and waiting), summed (full-model blocks)."""
    covers_demand: bool
    """demand_blocks <= plan_fill_target * capacity_after_blocks."""
    estimate: PipelineEstimate

    @property
    def g(self) -> int:
        """Pipeline stages."""
        return len(self.instance_ids)

    @property
    def leader(self) -> int:
        return self.instance_ids[0]

    @property
    def capacity_multiplier(self) -> float:
        """KV capacity after over before; bound 1 + ((g-1)/g)·W/K (DESIGN.md §8)."""
        return self.capacity_after_blocks / self.capacity_before_blocks

    @property
    def fill_after(self) -> float:
        """Demand over post-drop capacity."""
        return self.demand_blocks / self.capacity_after_blocks


@dataclass(frozen=True)
class DropPlan:
    """Groups to form now; instances in no group keep serving alone."""

    groups: tuple[Group, ...]

    @property
    def instance_ids(self) -> tuple[int, ...]:
        return tuple(i for grp in self.groups for i in grp.instance_ids)


@dataclass(frozen=True)
class RestorePlan:
    """Split a group back into full-model instances (DESIGN.md §6.6).

    Which member becomes the home of each pipeline request is the executor's choice; the plan
    states the aggregate capacity check it passed.
    """

    group_id: int
    instance_ids: tuple[int, ...]
    """Members in stage order."""
    live_demand_blocks: int
    """KV the group's requests need now (full-model blocks)."""
    normal_capacity_blocks: tuple[int, ...]
    """Each member's KV capacity once its weights are back (full-model blocks)."""
    capacity_limit_blocks: int
    """floor(restore_fill_limit * sum(normal_capacity_blocks)); live demand is at most this."""
    refill_bytes: tuple[int, ...]
    """Weight bytes each member copies back from a peer that kept them."""
    expected_refill_s: float | None
    """Slowest member's refill time over the profiled link; None without a cost model."""
