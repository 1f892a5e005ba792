"""A worker's memory across a drop and a restore: weights out, KV in, and back.

KunServe §3(a), §3(d) (reference/kunserve.md); DESIGN.md §5-6. The transition steps
(workers/transition.py) see one interface, :class:`StageMemory`, whatever holds the bytes:

- :class:`TorchStageMemory`: the torch allocator (``--memory-backend torch``, and CPU tests):
  a drop lets the dropped modules be freed and grows the flat KV buffer by their bytes
  (:class:`~workers.kv_buffer.KVBuffer`: allocate and copy the kept prefix); a restore shrinks
  it back and copies the dropped modules from the stages that kept them.
- :class:`VmmStageMemory`: VMM memory (``--memory-backend vmm``; emulated on CPU): a drop maps
  the dropped layers' chunks at the end of the KV range (no copy, no allocation); a restore maps
  them back under the layers and refills them from the stages that kept them, or only adopts
  them when a live restore refilled them while the group served (``prefetch``,
  workers/weight_exchange.py).

The KV bytes are one flat buffer viewed as blocks of any layer count (``view(layers)``); a drop
and a restore keep its prefix, so blocks that pre-drop requests hold in the L-layer view keep
their bytes (DESIGN.md §5: blocks keep their format until their KV has moved).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from attention.transport import StageTransport
from workers import weight_exchange
from workers.kv_buffer import KVBuffer
from workers.memory import WorkerMemory
from workers.models.llama import LlamaModel
from workers.pipeline import (
    build_stage_model,
    check_materialized,
    dropped_param_bytes,
    empty_model,
    point_layers_at_kv_slots,
    restore_full_model,
    stage_graphs_for,
)
from workers.weight_arena import place_model_in_arena
from workers.weight_exchange import WeightCopy


@dataclass
class StagedDrop:
    """A drop made ready while the full model still serves (:meth:`StageMemory.stage_drop`),
    so the engines park only for what must change at once (KunServe §3(a): requests keep
    decoding while the group forms). Staging changes nothing the engine reads."""

    model: LlamaModel
    """The full model it was staged from; a drop of another model stages anew."""
    layer_range: tuple[int, int]
    stage: LlamaModel
    """The stage model over the kept modules, its layers not yet pointed at their KV slots
    (they still serve in ``model``)."""
    freed_bytes: int
    parked: list[tuple[nn.Module, str, torch.Tensor, nn.Parameter]] = field(default_factory=list)
    """VMM: each dropped parameter's module, name, arena view, and the meta parameter that
    replaces it at the drop (the view becomes KV)."""
    premapped: int = 0
    """VMM: chunks newly mapped at the end of the KV range as stale aliases (0 where a
    previous drop left them there)."""

    def matches(self, model: LlamaModel, layer_range: tuple[int, int]) -> bool:
        return self.model is model and self.layer_range == tuple(layer_range)


class StageMemory(Protocol):
    """What a transition needs of a worker's memory (one instance per worker, made at its
    first drop and kept, so ``normal_bytes`` is the KV size of normal mode)."""

    normal_bytes: int
    """KV bytes in normal mode (before the first drop)."""

    @property
    def nbytes(self) -> int:
        """KV bytes usable now."""

    def block_bytes(self, layers: int) -> int:
        """Bytes of one KV block of ``layers`` layers."""

    def view(self, layers: int) -> torch.Tensor:
        """``[num_blocks, layers, 2, block_size, num_kv_heads, head_dim]`` over the KV bytes'
        prefix (no copy)."""

    def bytes_after_drop(self, model: LlamaModel, layer_range: tuple[int, int]) -> int:
        """KV bytes :meth:`drop` would leave usable (changes nothing)."""

    def stage_drop(self, model: LlamaModel, layer_range: tuple[int, int]) -> StagedDrop:
        """What :meth:`drop` can do while ``model`` still serves (another thread may run it):
        the stage model, and on VMM the meta parameters and the KV range's mappings (stale
        aliases past the live blocks). Raises ValueError, changing nothing ``model`` reads,
        where :meth:`drop` would."""

    def drop(
        self, model: LlamaModel, layer_range: tuple[int, int], staged: StagedDrop | None = None
    ) -> LlamaModel:
        """Keeps ``layer_range`` of ``model`` (no reload, no copy), hands the rest's memory to
        the KV bytes (prefix kept). Returns the stage model; ``model`` must not be used again.
        ``staged``: this drop's :meth:`stage_drop`, made earlier (else it is staged now)."""

    def restore(
        self,
        model: LlamaModel,
        ranks: Sequence[int],
        ranges: Sequence[tuple[int, int]],
        stage: int,
        transport: StageTransport,
        done: Sequence[WeightCopy] = (),
    ) -> LlamaModel:
        """Every stage of the group at once: shrinks the KV bytes back to ``normal_bytes``
        (prefix kept; the caller has moved live KV out of the rest) and rebuilds the full model
        from this stage's modules and the other stages' (KunServe §3(d): from the peer that kept
        them), copying all but the ``done`` copies (those :meth:`prefetch` ran). Returns the
        full model."""

    refills_in_place: bool
    """Whether a restore keeps each dropped region's memory mapped at its weight address, so
    :meth:`prefetch` can refill it while the group still serves (workers/weight_exchange.py)."""

    def region_nbytes(self, region: int) -> int:
        """Bytes one weight region copies (arena index: -1 embedding, a layer, L head); only
        where ``refills_in_place``."""

    def prefetch(
        self,
        copies: Sequence[WeightCopy],
        ranks: Sequence[int],
        ranges: Sequence[tuple[int, int]],
        stage: int,
        transport: StageTransport,
    ) -> int:
        """Runs a step's share of the restore's weight copies (the leader planned them after
        fencing the KV tail, workers/weight_exchange.py); returns the bytes received. Raises
        RuntimeError when a region this worker receives would not keep its bytes through the
        restore (not ``refills_in_place``, or its chunk is no longer where the restore adopts
        it)."""


class TorchStageMemory:
    """:class:`StageMemory` over the torch allocator: the runner's KV cache, adopted as a
    :class:`KVBuffer`."""

    def __init__(self, kv_cache: torch.Tensor) -> None:
        self.buffer = KVBuffer.adopt(kv_cache)
        self.normal_bytes = self.buffer.nbytes

    @property
    def nbytes(self) -> int:
        return self.buffer.nbytes

    def block_bytes(self, layers: int) -> int:
        return self.buffer.block_bytes(layers)

    def view(self, layers: int) -> torch.Tensor:
        return self.buffer.view(layers)

    def bytes_after_drop(self, model: LlamaModel, layer_range: tuple[int, int]) -> int:
        return self.buffer.nbytes + dropped_param_bytes(model, layer_range)

    def stage_drop(self, model: LlamaModel, layer_range: tuple[int, int]) -> StagedDrop:
        stage, freed = build_stage_model(model, layer_range, point=False)
        return StagedDrop(model, tuple(layer_range), stage, freed)

    def drop(
        self, model: LlamaModel, layer_range: tuple[int, int], staged: StagedDrop | None = None
    ) -> LlamaModel:
        if staged is None or not staged.matches(model, layer_range):
            staged = self.stage_drop(model, layer_range)
        point_layers_at_kv_slots(staged.stage)
        self.buffer.resize(self.buffer.nbytes + staged.freed_bytes)
        return staged.stage

    def restore(
        self,
        model: LlamaModel,
        ranks: Sequence[int],
        ranges: Sequence[tuple[int, int]],
        stage: int,
        transport: StageTransport,
        done: Sequence[WeightCopy] = (),
    ) -> LlamaModel:
        if done:
            raise ValueError("the torch allocator refills no weights before a restore")
        self.buffer.resize(self.normal_bytes)
        return restore_full_model(model, ranks, ranges, stage, transport)

    refills_in_place = False

    def region_nbytes(self, region: int) -> int:
        raise RuntimeError("the torch allocator refills no weights before a restore")

    def prefetch(
        self,
        copies: Sequence[WeightCopy],
        ranks: Sequence[int],
        ranges: Sequence[tuple[int, int]],
        stage: int,
        transport: StageTransport,
    ) -> int:
        raise RuntimeError(
            "the torch allocator frees dropped weights: they cannot be refilled before a restore"
        )


class VmmStageMemory:
    """:class:`StageMemory` over a worker's VMM memory (:class:`~workers.memory.WorkerMemory`):
    the KV bytes are the KV pool's mapped prefix, viewed from its fixed base.

    A drop maps the dropped regions' chunks at the end of the KV range (``drop_layers``: one
    chunk per region, no copy, no allocation), so the KV bytes grow by exactly those chunks'
    bytes, padding included. The regions are the decoder layers outside the stage's range, the
    embedding unless the stage is first and the head (final norm and LM head, a tied head being
    its own copy) unless it is last, indexed -1 and L in the arena (workers/weight_arena.py).
    A restore brings each back from the stage that kept it, through the transport
    (:meth:`StageTransport.exchange`), and binds a new full model to the arena.

    Both are lazy (``WorkerMemory``'s default): a chunk stays mapped where it was as a stale
    alias, so a drop is one ``cuMemMap`` per layer and one ``cuMemSetAccess`` per run of layers
    with no device sync, and the restore after it adopts every chunk back with no driver call
    at all (eagerly, each would pay a device sync and a ``cuMemUnmap``). ``check_integrity``
    holds throughout, since each alias maps a chunk that the arena holds or the KV pool has
    live; nothing reads an alias: the dropped layers' parameters go to the meta device at the
    drop, and block ids past the KV pool's prefix are never handed out. ``WorkerMemory.flush``
    unmaps the aliases (when idle); a repeat of the same drop adopts them instead.

    The KV pool's own ``BlockPool`` (the engine's pool in normal mode) is replaced by a free one
    at the drop: the group's scheduler allocates from a pool of its own, and the pre-drop
    allocations must not stop the KV pool from shrinking back at the restore (whose caller has
    moved the live KV out of the tail by then).
    """

    def __init__(self, memory: WorkerMemory) -> None:
        self.memory = memory
        self.normal_bytes = memory.kv.mapped_bytes
        self._full: LlamaModel | None = None
        """The full model of the last drop, kept for the restore (its kept modules serve in
        the stage model meanwhile), and its dropped parameters' arena views."""
        self._parked: list[tuple[nn.Module, str, torch.Tensor]] = []

    @property
    def nbytes(self) -> int:
        return self.memory.kv.mapped_bytes

    def block_bytes(self, layers: int) -> int:
        return self._buffer().block_bytes(layers)

    def view(self, layers: int) -> torch.Tensor:
        return self._buffer().view(layers)

    def _buffer(self) -> KVBuffer:
        """The KV pool's mapped prefix as a :class:`KVBuffer` (no copy)."""
        fmt, prefix = self.memory.kv.fmt, self.memory.kv.prefix_bytes()
        shape = (fmt.block_size, fmt.num_kv_heads, fmt.head_dim)
        return KVBuffer(prefix.numel(), shape, fmt.dtype, prefix.device, data=prefix)

    def bytes_after_drop(self, model: LlamaModel, layer_range: tuple[int, int]) -> int:
        arena = self.memory.arena
        return self.nbytes + sum(arena.layer_nbytes(a, b) for a, b in _dropped(model, layer_range))

    def stage_drop(self, model: LlamaModel, layer_range: tuple[int, int]) -> StagedDrop:
        """Also maps the dropped regions' chunks where the drop puts them (``premap_drops``):
        a first drop's ``cuMemMap`` and ``cuMemSetAccess`` calls happen here, not while the
        engines are parked. Raises ValueError, changing nothing, when ``layer_range`` is not
        inside ``model``, a layer to drop is not held, or the KV range lacks room."""
        runs = self._check_drop(model, layer_range)
        stage, freed = build_stage_model(model, layer_range, point=False)
        parked = [
            (m, n, p.data, nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False))
            for a, b in runs
            for j in range(a, b)
            for module in _modules_of(model, j)
            for m in module.modules()
            for n, p in m.named_parameters(recurse=False)
        ]
        premapped = self.memory.premap_drops(runs)
        return StagedDrop(model, tuple(layer_range), stage, freed, parked, premapped)

    def _check_drop(self, model: LlamaModel, layer_range: tuple[int, int]) -> list:
        runs = _dropped(model, layer_range)
        kv, arena = self.memory.kv, self.memory.arena
        for a, b in runs:
            arena.check_layers(a, b, dropped=False)
        need = sum(arena.num_layer_slots(a, b) for a, b in runs)
        if need > kv.range.num_slots - kv.mapped_slots:
            raise ValueError(
                f"the KV range has room for {kv.range.num_slots - kv.mapped_slots} more slots, "
                f"the dropped layers need {need}"
            )
        return runs

    def drop(
        self, model: LlamaModel, layer_range: tuple[int, int], staged: StagedDrop | None = None
    ) -> LlamaModel:
        """Raises ValueError, changing nothing, when ``layer_range`` is not inside ``model``,
        a layer to drop is not held, or the KV range lacks room for the chunks."""
        runs = self._check_drop(model, layer_range)
        if staged is None or not staged.matches(model, layer_range):
            staged = self.stage_drop(model, layer_range)
        # the dropped parameters' arena views become KV: nothing may read them as weights
        for m, name, _, meta in staged.parked:
            m._parameters[name] = meta
        self._full = model
        self._parked = [(m, name, view) for m, name, view, _ in staged.parked]
        point_layers_at_kv_slots(staged.stage)
        self.memory.kv.detach_block_pool()
        for a, b in runs:  # the staged mappings are adopted: no driver call
            self.memory.drop_layers(a, b)
        return staged.stage

    refills_in_place = True

    def region_nbytes(self, region: int) -> int:
        return self.memory.arena.layer_nbytes(region, region + 1)

    def restore(
        self,
        model: LlamaModel,
        ranks: Sequence[int],
        ranges: Sequence[tuple[int, int]],
        stage: int,
        transport: StageTransport,
        done: Sequence[WeightCopy] = (),
    ) -> LlamaModel:
        """Maps the KV tail back under every layer this worker dropped (the stages' ranges last
        first, each range's layers in ``restore_order``), then moves all layers at once but the
        ``done`` copies: this worker sends each layer it kept to every other stage while it
        receives the others' (:meth:`StageTransport.exchange`, both directions of every link
        busy together). Raises ValueError, before any transfer, when this worker did not drop
        exactly the other stages' layers, and RuntimeError when a region it received before
        (``done``) would not keep its bytes."""
        arena, num_layers = self.memory.arena, model.cfg.num_layers
        self._check_restore(ranges, stage, num_layers)
        me = ranks[stage]
        received = {c.region for c in done if c.dst_rank == me}
        self._require_in_place(received, ranges, stage, num_layers)
        runs = self._restore_runs(ranges, stage, num_layers)
        for start, end in runs:
            self.memory.restore_layers(start, end, None)
        todo = [c for c in weight_exchange.plan_restore(ranks, ranges, num_layers) if c not in done]
        weight_exchange.run(todo, me, arena, transport)
        return self._full_model(model)

    def _full_model(self, stage: LlamaModel) -> LlamaModel:
        """The full model over the arena again: the drop's own model with its dropped
        parameters pointed back at their views (no model built, no view made: a Llama-3-8B
        takes ~10 ms of host time to build on meta and bind), else a new one bound to the
        arena."""
        full, parked = self._full, self._parked
        self._full, self._parked = None, []
        if full is None:
            full = empty_model(stage, (0, stage.cfg.num_layers))
            place_model_in_arena(full, self.memory.arena)
            return full.eval()
        for module, name, view in parked:
            setattr(module, name, nn.Parameter(view, requires_grad=False))
        point_layers_at_kv_slots(full)  # the stage model re-pointed its kept layers
        check_materialized(full)
        return full.eval()

    def prefetch(
        self,
        copies: Sequence[WeightCopy],
        ranks: Sequence[int],
        ranges: Sequence[tuple[int, int]],
        stage: int,
        transport: StageTransport,
    ) -> int:
        me, num_layers = ranks[stage], ranges[-1][1]
        received = {c.region for c in copies if c.dst_rank == me}
        self._require_in_place(received, ranges, stage, num_layers)
        return weight_exchange.run(copies, me, self.memory.arena, transport)

    def _restore_runs(
        self, ranges: Sequence[tuple[int, int]], stage: int, num_layers: int
    ) -> list[tuple[int, int]]:
        """The region runs this worker restores, in the order it restores them: the other
        stages' regions, last stage first."""
        owned = weight_exchange.owned_regions(ranges, num_layers)
        return [owned[s] for s in reversed(range(len(ranges))) if s != stage]

    def _require_in_place(
        self, regions: set[int], ranges: Sequence[tuple[int, int]], stage: int, num_layers: int
    ) -> None:
        if not regions:
            return
        runs = self._restore_runs(ranges, stage, num_layers)
        lost = regions - self.memory.restores_in_place(runs)
        if lost:
            raise RuntimeError(
                f"regions {sorted(lost)} are refilled before the restore, but the restore would "
                "not adopt their chunks where they are mapped: the refill would be lost"
            )

    def _check_restore(
        self, ranges: Sequence[tuple[int, int]], stage: int, num_layers: int
    ) -> None:
        bounds = [0, *(end for _, end in ranges)]
        if [start for start, _ in ranges] != bounds[:-1] or bounds[-1] != num_layers:
            raise ValueError(f"stage ranges {list(ranges)} do not split [0, {num_layers})")
        start, end = ranges[stage]
        arena = self.memory.arena
        kept = range(*weight_exchange.owned_regions(ranges, num_layers)[stage])
        if arena.dropped != set(range(-1, num_layers + 1)) - set(kept):
            raise ValueError(
                f"stage {stage} keeps [{start}, {end}) but the arena has dropped "
                f"{sorted(arena.dropped)}"
            )
        others = ((-1, kept.start), (kept.stop, num_layers + 1))
        grown = sum(arena.layer_nbytes(a, b) for a, b in others if a < b)
        if self.nbytes != self.normal_bytes + grown:
            raise ValueError(
                f"KV bytes {self.nbytes} are not the normal {self.normal_bytes} plus the dropped "
                f"layers' {grown}"
            )


def _dropped(model: LlamaModel, layer_range: tuple[int, int]) -> list[tuple[int, int]]:
    """The runs of arena regions a full ``model`` drops to keep ``layer_range``: the layers
    outside it, with the embedding (-1) unless it starts at 0 and the head (L) unless it ends
    at L. Raises ValueError when ``layer_range`` is not inside what ``model`` holds, or
    ``model`` is not the full model."""
    start, end = layer_range
    if not model.start <= start < end <= model.end:
        raise ValueError(f"[{start}, {end}) is not inside [{model.start}, {model.end})")
    n = model.cfg.num_layers
    if (model.start, model.end) != (0, n):
        raise ValueError(
            f"a drop starts from the full model, not layers [{model.start}, {model.end})"
        )
    low = -1 if start > 0 else 0
    high = n + 1 if end < n else n
    return [(a, b) for a, b in ((low, start), (end, high)) if a < b]


def _modules_of(model: LlamaModel, region: int) -> list[nn.Module]:
    """The modules of a full ``model`` over arena region ``region`` (-1, a layer, or L)."""
    if region == -1:
        return [model.embed_tokens]
    if region == model.cfg.num_layers:
        return [model.norm, model.lm_head]
    return [model.layers[region]]


def capture_stage_graphs(runner: Any, ranges: Sequence[tuple[int, int]]) -> int:
    """At start-up, before any drop: captures every decode and piecewise graph of the stages a
    drop may make of this worker (each layer range of ``ranges``) over the stage views of its
    KV bytes, so the pipeline's first decode micro-batches replay instead of capturing one size
    after another (15-36 ms each on an H200, on every stage: a stall for every request of the
    micro-batch). A view made now has fewer blocks than the one after a drop, at the same base
    with the same strides, and the weights do not move: ``stage_graphs_for`` finds the graphs
    and keeps them. Only on VMM memory (the torch allocator moves the KV cache at a drop) and
    where graphs run at all; returns the sizes captured (decode batch sizes and piecewise
    token counts, :meth:`StageGraphs.capture_all`)."""
    if runner.memory is None:
        return 0
    full, memory, count = runner.model, VmmStageMemory(runner.memory), 0
    try:
        for start, end in ranges:
            stage, _ = build_stage_model(full, (start, end))
            graphs = stage_graphs_for(runner, model=stage, kv_cache=memory.view(end - start))
            if graphs is None:  # no graphs on this device, backend or config
                return 0
            count += graphs.capture_all()
    finally:
        point_layers_at_kv_slots(full)  # the stage models re-pointed the layers
    return count


def stage_memory_for(runner: Any) -> StageMemory:
    """The :class:`StageMemory` of a ModelRunner in normal mode: VMM when ``runner.memory``
    is set, else the torch allocator's."""
    if runner.memory is not None:
        return VmmStageMemory(runner.memory)
    return TorchStageMemory(runner.kv_cache)
