"""The weight arena: a model stage's parameters in one VMM range, each layer on whole chunks.

Layout (one reserved range, slot-aligned regions, tensors 256-byte aligned inside them)::

    | embed (first stage) | layer s | layer s+1 | ... | layer e-1 | head: norm, lm_head (last) |

Regions are indexed like decoder layers, with the embedding as ``-1`` and the head (final
norm and LM head) as ``L`` (the model's layer count): "layers" ``[start, end)`` below are runs
of these indices, so a stage that keeps decoder layers ``[s, e)`` drops ``[-1, s)`` (the
embedding too, unless it is the first stage) and ``[e, L + 1)`` (the head too, unless last).

Each region is backed by chunks of exactly its slots, normally one chunk (one ``cuMemCreate``
of the region's 2 MiB-aligned size), so dropping layers ``[start, end)`` hands back one chunk
per layer (which becomes KV cache with one ``cuMemMap`` each: Oneiros' remap, DESIGN §5-6),
and restoring maps chunks back and refills them with one contiguous copy per layer from a
pinned host copy (``HostCopy``) or a peer worker that kept the layers (``PeerSource``, NCCL).
Parameters are zero-copy views into the arena (``place_model_in_arena``), so the model's
pointers never change across a drop and restore; a dropped layer's views must not be used.
"""

from __future__ import annotations

import functools
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from kernels.vmm import Chunk, ChunkPool, VirtualRange

TENSOR_ALIGN = 256
"""Byte alignment of every tensor inside its region (wide vector loads in kernels)."""


@dataclass(frozen=True)
class TensorPlace:
    """Where one parameter lives: ``offset`` bytes from the arena base."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class Region:
    """A run of whole chunks: decoder layer ``layer`` (global index), ``embed`` (layer -1) or
    ``head`` (layer L: final norm and LM head); None only in layouts built by hand."""

    key: str
    layer: int | None
    first_slot: int
    num_slots: int
    tensors: tuple[TensorPlace, ...]


TensorSpec = tuple[str, tuple[int, ...], torch.dtype]
"""(parameter name, shape, dtype) of one tensor to place."""


@dataclass(frozen=True)
class ArenaLayout:
    """Regions in address order; decoder layers are consecutive and ascending."""

    chunk_bytes: int
    regions: tuple[Region, ...]

    @classmethod
    def build(
        cls, groups: Sequence[tuple[str, int | None, Sequence[TensorSpec]]], chunk_bytes: int
    ) -> ArenaLayout:
        """Packs each group ``(key, layer, specs)`` into its own run of chunks, in order.
        Raises ValueError for duplicate names or non-consecutive layers."""
        regions, slot = [], 0
        for key, layer, specs in groups:
            places, used = [], 0
            for name, shape, dtype in specs:
                used = -(-used // TENSOR_ALIGN) * TENSOR_ALIGN
                places.append(TensorPlace(name, tuple(shape), dtype, slot * chunk_bytes + used))
                used += places[-1].nbytes
            n = max(1, -(-used // chunk_bytes))
            regions.append(Region(key, layer, slot, n, tuple(places)))
            slot += n
        layout = cls(chunk_bytes, tuple(regions))
        layers = layout.layers
        if layers and layers != list(range(layers[0], layers[0] + len(layers))):
            raise ValueError(f"decoder layers must be consecutive and ascending, got {layers}")
        names = [t.name for r in regions for t in r.tensors]
        if len(set(names)) != len(names):
            raise ValueError("a tensor name appears twice in the layout")
        return layout

    @property
    def num_slots(self) -> int:
        return sum(r.num_slots for r in self.regions)

    @property
    def layers(self) -> list[int]:
        return [r.layer for r in self.regions if r.layer is not None]

    def place(self, name: str) -> tuple[Region, TensorPlace]:
        """The region and place of tensor ``name``. Raises KeyError naming the tensor."""
        if name not in self._places:
            raise KeyError(f"tensor {name!r} is not in the arena layout")
        return self._places[name]

    @functools.cached_property
    def _places(self) -> dict[str, tuple[Region, TensorPlace]]:
        return {t.name: (r, t) for r in self.regions for t in r.tensors}

    def layer_run(self, start: int, end: int) -> tuple[int, int]:
        """(first slot, slot count) of layers ``[start, end)``. Raises ValueError when the
        range is empty or outside the layers the layout holds."""
        layers = self.layers
        if not layers or not layers[0] <= start < end <= layers[-1] + 1:
            held = f"[{layers[0]}, {layers[-1] + 1})" if layers else "none"
            raise ValueError(f"layer range [{start}, {end}) is empty or outside the held {held}")
        regions = {r.layer: r for r in self.regions if r.layer is not None}
        first = regions[start].first_slot
        return first, regions[end - 1].first_slot + regions[end - 1].num_slots - first


def layout_for_model(model: nn.Module, dtype: torch.dtype, chunk_bytes: int) -> ArenaLayout:
    """The layout of a ``LlamaModel`` stage: embed (index -1), its layers, head (index
    ``model.end``); floats become ``dtype``.

    Works on a meta-device model (shapes only). Layer ``i`` of the stage is global layer
    ``model.start + i``.
    """
    groups: dict[str, tuple[int, list[TensorSpec]]] = {}
    start = getattr(model, "start", 0)
    end = getattr(model, "end", start + len(getattr(model, "layers", ())))
    for name, p in model.named_parameters():
        key, layer = _region_of(name, start, end)
        kind = dtype if p.dtype.is_floating_point else p.dtype
        groups.setdefault(key, (layer, []))[1].append((name, tuple(p.shape), kind))
    order = sorted(groups, key=lambda k: groups[k][0])
    return ArenaLayout.build([(k, *groups[k]) for k in order], chunk_bytes)


def _region_of(name: str, first_layer: int, end_layer: int) -> tuple[str, int]:
    if name.startswith("layers."):
        layer = first_layer + int(name.split(".")[1])
        return f"layer.{layer}", layer
    return ("embed", -1) if name.startswith("embed_tokens.") else ("head", end_layer)


class WeightArena:
    """The mapped arena of one layout, built from chunks leased from ``pool``: for each region
    one chunk of its slots if the pool has one free, else one-slot chunks. No mapping ever
    crosses a region boundary.

    ``drop_layers`` unmaps layers and returns their chunks; ``restore_layers`` maps chunks
    back and refills them. Raises ValueError for layer ranges that are empty, outside the
    layout, or not all held (drop) / not all dropped (restore), and when the pool is short.
    """

    def __init__(self, pool: ChunkPool, layout: ArenaLayout) -> None:
        if layout.chunk_bytes != pool.backend.chunk_bytes:
            raise ValueError(
                f"layout chunks {layout.chunk_bytes} != pool's {pool.backend.chunk_bytes}"
            )
        free, chunks = pool.num_free, []
        for region in layout.regions:
            got = pool.take_slots(region.num_slots)
            if got is None:
                pool.give(chunks)
                raise ValueError(
                    f"chunk pool has {free} free chunks, the arena needs {layout.num_slots} "
                    f"slots in {len(layout.regions)} regions (none free for {region.key!r})"
                )
            chunks += got
        self.pool, self.layout = pool, layout
        self.range = VirtualRange(pool.backend, layout.num_slots, "weights")
        self.range.map(0, chunks)
        self.dropped: set[int] = set()

    def tensor(self, name: str) -> torch.Tensor:
        """The zero-copy view of parameter ``name``. Raises ValueError if its layer is dropped."""
        region, place = self.layout.place(name)
        if region.layer in self.dropped:
            raise ValueError(f"{name}: layer {region.layer} is dropped")
        return self.range.view(place.offset, place.shape, place.dtype)

    def num_layer_slots(self, start: int, end: int) -> int:
        """Slots (``chunk_bytes`` each) that layers ``[start, end)`` occupy."""
        return self.layout.layer_run(start, end)[1]

    def layer_nbytes(self, start: int, end: int) -> int:
        """Bytes of the whole slots that layers ``[start, end)`` occupy (padding included):
        exactly what dropping them gives the KV pool."""
        return self.num_layer_slots(start, end) * self.layout.chunk_bytes

    def layer_bytes(self, start: int, end: int) -> torch.Tensor:
        """``[layer_nbytes]`` uint8 view of layers ``[start, end)`` (must be mapped)."""
        first, count = self.layout.layer_run(start, end)
        cb = self.layout.chunk_bytes
        return self.range.view(first * cb, (count * cb,), torch.uint8)

    def layer_chunks(self, start: int, end: int) -> list[Chunk]:
        """The chunks under held layers ``[start, end)``, in slot order (they stay mapped)."""
        self.check_layers(start, end, dropped=False)
        first, count = self.layout.layer_run(start, end)
        return [c for _, c in self.range.mappings(first, first + count)]

    def check_layers(self, start: int, end: int, *, dropped: bool) -> None:
        """Raises ValueError unless every layer of ``[start, end)`` is dropped (or held)."""
        self.layout.layer_run(start, end)
        wrong = [i for i in range(start, end) if (i in self.dropped) != dropped]
        if wrong:
            state = "held" if dropped else "dropped"
            raise ValueError(
                f"layers {wrong} are {state}: cannot {'restore' if dropped else 'drop'} them"
            )

    def drop_layers(self, start: int, end: int, *, unmap: bool = True) -> list[Chunk]:
        """Drops layers ``[start, end)`` and returns their chunks in slot order.

        With ``unmap`` the slots are unmapped (after a device sync); without, the chunks stay
        mapped here as stale aliases until ``unmap_stale``, so the caller can map them into the
        KV pool at once (CUDA allows one chunk in two ranges). Either way the layers' views
        must not be used again until they are restored.
        """
        chunks = self.layer_chunks(start, end)
        if unmap:
            first, count = self.layout.layer_run(start, end)
            self.range.unmap(first, count)
        self.dropped.update(range(start, end))
        return chunks

    def restore_layers(
        self, start: int, end: int, chunks: Sequence[Chunk], source: WeightSource | None
    ) -> None:
        """Maps ``chunks`` (any whose slots add up to the layers', in order) back to back under
        dropped layers ``[start, end)`` and, with a ``source``, enqueues their refill on the
        current stream. A chunk still mapped at its place (a stale alias) is kept with no
        driver call."""
        self.check_layers(start, end, dropped=True)
        first, count = self.layout.layer_run(start, end)
        got = sum(c.num_slots for c in chunks)
        if got != count:
            raise ValueError(
                f"layers [{start}, {end}) need chunks of {count} slots in all, got {got}"
            )
        self.range.remap(first, chunks)
        self.dropped.difference_update(range(start, end))
        if source is not None:
            source.fill(self, start, end)

    def held_chunks(self) -> list[Chunk]:
        """Chunks under layers and regions that are not dropped."""
        dropped = self._dropped_slots()
        return [c for s, c in self.range.mappings() if s not in dropped]

    def stale_chunks(self) -> list[Chunk]:
        """Chunks still mapped under dropped layers (lent to the KV pool, not yet unmapped)."""
        dropped = self._dropped_slots()
        return [c for s, c in self.range.mappings() if s in dropped]

    def unmap_stale(self) -> int:
        """Unmaps the chunks still mapped under dropped layers (after one device sync, one
        backend call per run of adjacent dropped layers); returns how many."""
        runs = _runs(sorted(r.layer for r in self.layout.regions if r.layer in self.dropped))
        if not self.stale_chunks():
            return 0
        self.range.backend.synchronize()
        unmapped = 0
        for start, end in runs:
            first, count = self.layout.layer_run(start, end)
            unmapped += len(self.range.unmap_within(first, first + count, sync=False))  # synced
        return unmapped

    def close(self) -> None:
        """Unmaps the arena and returns its held chunks to the pool (stale aliases belong to
        the KV pool)."""
        self.unmap_stale()
        self.pool.give(self.range.close())

    def _dropped_slots(self) -> set[int]:
        regions = (r for r in self.layout.regions if r.layer in self.dropped)
        return {s for r in regions for s in range(r.first_slot, r.first_slot + r.num_slots)}


def _runs(layers: list[int]) -> list[tuple[int, int]]:
    """Sorted layer ids -> ``[(start, end)]`` of consecutive runs."""
    out: list[tuple[int, int]] = []
    for i in layers:
        if out and out[-1][1] == i:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


def restore_order(start: int, end: int) -> list[int]:
    """Layers in the order a restore refills them: last first. A drop appends its layers'
    chunks to the KV pool in ascending order, so taking the KV tail back last layer first
    hands each layer its own chunks, which a lazy drop left mapped (no driver call). Peers
    send in this order too (``PeerSource``, ``send_layers``)."""
    return list(range(end - 1, start - 1, -1))


class WeightSource(ABC):
    """Where restored layers are refilled from. ``fill`` enqueues the copies into
    ``arena.layer_bytes(start, end)`` and returns; work queued after it on the current
    stream sees the weights."""

    @abstractmethod
    def fill(self, arena: WeightArena, start: int, end: int) -> None: ...


class HostCopy(WeightSource):
    """A host copy of the byte image of layers ``[start, end)`` (pinned when the arena is on
    CUDA), taken while they are held. Restores any sub-range with one copy per call."""

    def __init__(self, arena: WeightArena, start: int, end: int) -> None:
        src = arena.layer_bytes(start, end)
        self.start, self.end = start, end
        self.first_slot = arena.layout.layer_run(start, end)[0]
        self.host = torch.empty(src.numel(), dtype=torch.uint8, pin_memory=src.is_cuda)
        self.host.copy_(src)

    def fill(self, arena: WeightArena, start: int, end: int) -> None:
        if not self.start <= start < end <= self.end:
            raise ValueError(
                f"host copy holds layers [{self.start}, {self.end}), not [{start}, {end})"
            )
        first, count = arena.layout.layer_run(start, end)
        lo = (first - self.first_slot) * arena.layout.chunk_bytes
        hi = lo + count * arena.layout.chunk_bytes
        arena.layer_bytes(start, end).copy_(self.host[lo:hi], non_blocking=True)


class PeerSource(WeightSource):
    """Receives layers from worker ``src`` of ``group`` (torch.distributed point-to-point: NCCL
    on GPU, gloo on CPU), which calls ``send_layers`` for the same range. Both arenas must have
    the same layout for those layers (same model shape and dtype). One message per layer, in
    ``restore_order``."""

    def __init__(self, src: int, group: object | None = None) -> None:
        self.src, self.group = src, group

    def fill(self, arena: WeightArena, start: int, end: int) -> None:
        import torch.distributed as dist

        for layer in restore_order(start, end):
            dist.recv(arena.layer_bytes(layer, layer + 1), src=self.src, group=self.group)


def send_layers(
    arena: WeightArena, start: int, end: int, dst: int, group: object | None = None
) -> None:
    """The sending half of ``PeerSource``: one message per held layer, in ``restore_order``."""
    import torch.distributed as dist

    arena.check_layers(start, end, dropped=False)
    for layer in restore_order(start, end):
        dist.send(arena.layer_bytes(layer, layer + 1), dst=dst, group=group)


def place_model_in_arena(model: nn.Module, arena: WeightArena) -> None:
    """Re-points every parameter of ``model`` at its arena view, layer by layer.

    A parameter with values is copied into its view; a meta-device one (a model built under
    ``torch.device("meta")``) is only bound, to be filled later (``load_weights``, dummy
    init). Each parameter object is replaced by one over the view (``requires_grad=False``),
    so hold no old references. Raises KeyError for a parameter the layout lacks.
    """
    for module_name, module in model.named_modules():
        for pname, p in list(module.named_parameters(recurse=False)):
            view = arena.tensor(f"{module_name}.{pname}" if module_name else pname)
            if p.shape != view.shape:
                raise ValueError(f"{module_name}.{pname}: shape {tuple(p.shape)} != arena's")
            if p.device.type != "meta":
                view.copy_(p.detach())
            setattr(module, pname, nn.Parameter(view, requires_grad=False))
