"""KV slice copies between the workers of a pipeline group.

KunServe §3(c)-(d) (reference/kunserve.md). Two users walk the same plans: the live exchange
after a drop (workers/remote_attention.py: a pre-drop request's layer slices move from its
home's L-layer blocks to the stages that own those layers, a budget per step), and a restore,
where each stage's slice of every request moves back into L-layer blocks on its new home while
the engines are parked (KunServe's blocking ``reshard`` mode).

A plan is a list of :class:`SliceCopy`, one per ordered (source, destination) worker pair, in
one global order that every worker walks: the sender gathers and sends, the receiver receives,
a local pair copies. Because the source and destination views may alias the same bytes (one
buffer re-viewed, DESIGN.md §5), every slice is read into a scratch tensor first (:func:`read`)
and written only after the buffer has been re-viewed (:func:`write`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from attention.metadata import host_tensor
from attention.transport import StageTransport


@dataclass(frozen=True)
class BlockMove:
    """One request's KV blocks: ``src_blocks`` on the worker of rank ``home`` (or on every
    stage, for pipeline blocks) become ``dst_blocks`` (same count, same token order)."""

    request_id: str
    home: int
    src_blocks: tuple[int, ...]
    dst_blocks: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.src_blocks) != len(self.dst_blocks):
            raise ValueError(
                f"{self.request_id}: {len(self.src_blocks)} source blocks but "
                f"{len(self.dst_blocks)} destination blocks"
            )


@dataclass(frozen=True)
class SliceCopy:
    """Layers ``src_layers`` of blocks ``src_blocks`` in the source rank's current view go to
    layers ``dst_layers`` of blocks ``dst_blocks`` in the destination rank's next view."""

    src_rank: int
    dst_rank: int
    src_layers: tuple[int, int]
    dst_layers: tuple[int, int]
    src_blocks: tuple[int, ...] = ()
    dst_blocks: tuple[int, ...] = ()
    request_ids: tuple[str, ...] = field(default=(), compare=False)
    """For logs: the requests whose blocks these are."""

    @property
    def num_layers(self) -> int:
        return self.src_layers[1] - self.src_layers[0]


def plan_restore(
    moves: Sequence[BlockMove], ranks: Sequence[int], ranges: Sequence[tuple[int, int]]
) -> list[SliceCopy]:
    """Restore: for each stage r, all layers of each request's pipeline blocks on stage r go to
    layers ``ranges[r]`` of its new L-layer blocks on its home."""
    copies = []
    for src, (start, end) in sorted(zip(ranks, ranges, strict=True)):
        for dst in sorted(set(ranks)):
            mine = [m for m in moves if m.home == dst]
            copies.append(_pair(src, dst, (0, end - start), (start, end), mine))
    return [c for c in copies if c.src_blocks]


def _pair(
    src: int,
    dst: int,
    src_layers: tuple[int, int],
    dst_layers: tuple[int, int],
    moves: Sequence[BlockMove],
) -> SliceCopy:
    return SliceCopy(
        src_rank=src,
        dst_rank=dst,
        src_layers=src_layers,
        dst_layers=dst_layers,
        src_blocks=tuple(b for m in moves for b in m.src_blocks),
        dst_blocks=tuple(b for m in moves for b in m.dst_blocks),
        request_ids=tuple(m.request_id for m in moves),
    )


Pending = list[tuple[SliceCopy, torch.Tensor]]
"""Slices read (or received) for this worker, waiting for :func:`write`."""


def read(
    plan: Sequence[SliceCopy],
    me: int,
    view: torch.Tensor,  # [num_blocks, layers_per_block, 2, bs, H, D] this worker's current view
    transport: StageTransport | None,
) -> Pending:
    """Walks ``plan`` in order: gathers each slice this rank sends (sending it to a peer, or
    keeping it for a local copy) and receives each slice a peer sends here. Returns what this
    rank must write once its buffer has its next view."""
    pending: Pending = []
    for c in plan:
        if c.src_rank == me:
            a, b = c.src_layers
            idx = host_tensor(c.src_blocks, torch.int64, view.device)
            # only the layers that move are gathered (half of an L-layer block when half move)
            data = view[:, a:b].index_select(0, idx)
            if c.dst_rank == me:
                pending.append((c, data))
            else:
                _require(transport).send(c.dst_rank, data)
        elif c.dst_rank == me:
            shape = (len(c.src_blocks), c.num_layers, *view.shape[2:])
            pending.append((c, _require(transport).recv(c.src_rank, shape, view.dtype)))
    return pending


def write(pending: Pending, view: torch.Tensor) -> None:
    """Scatters the slices into ``view`` (this rank's next view), blocks and layers per copy."""
    for c, data in pending:
        a, b = c.dst_layers
        idx = host_tensor(c.dst_blocks, torch.int64, view.device)
        view[idx, a:b] = data


def _require(transport: StageTransport | None) -> StageTransport:
    if transport is None:
        raise RuntimeError("this KV plan crosses workers but no transport was given")
    return transport
