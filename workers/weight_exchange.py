"""A restore's weight copies: each dropped region back from the stage that kept it.

KunServe §3(d) (reference/kunserve.md): at a restore, every stage pulls the layers it dropped
from the peer that kept them. The copies are :class:`WeightCopy` units, one arena region
(workers/weight_arena.py: ``-1`` the embedding, ``0..L-1`` a decoder layer, ``L`` the head) from
one rank to another, in one order every member walks (:func:`plan_restore`), so each pair's
sends and receives match.

Two callers run them:

- the parked split (``StageMemory.restore``, workers/stage_memory.py) copies what is left;
- on VMM memory, the live part of a restore copies them first, a budget per pipelined step,
  while the group still serves (:class:`WeightPrefetch`). A drop maps each dropped region's
  chunk into the KV tail and leaves it mapped at its weight address too (a lazy alias), and the
  restore adopts that chunk back where it is. Once no live KV is left in the tail (the live
  gather has brought every running request's KV home into the normal region, and the leader
  fences the tail's block ids so nothing is allocated there again), writing the weights through
  their own addresses is writing the bytes the restore will keep. The split then only switches
  models: the copy, which is the link floor of a restore, leaves the pause.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from attention.transport import StageTransport
from workers.weight_arena import WeightArena, restore_order


@dataclass(frozen=True)
class WeightCopy:
    """Arena region ``region`` of the stage on ``src_rank``, into the same region on
    ``dst_rank`` (both arenas have one layout: same model, same dtype)."""

    src_rank: int
    dst_rank: int
    region: int


def owned_regions(ranges: Sequence[tuple[int, int]], num_layers: int) -> list[tuple[int, int]]:
    """Each stage's arena regions ``[a, b)``: its decoder layers, with the embedding (-1) on
    the first stage and the head (L) on the last."""
    last = len(ranges) - 1
    return [
        (-1 if s == 0 else a, num_layers + 1 if s == last else b) for s, (a, b) in enumerate(ranges)
    ]


def plan_restore(
    ranks: Sequence[int], ranges: Sequence[tuple[int, int]], num_layers: int
) -> list[WeightCopy]:
    """Every region each stage kept, to every other stage: stages last first, each stage's
    regions in ``restore_order`` (last first), each region to the other ranks in stage order.
    A receiver refills its dropped runs in the order a restore remaps them (workers/memory.py,
    ``restore_layers``)."""
    owned, copies = owned_regions(ranges, num_layers), []
    for s in reversed(range(len(ranks))):
        for region in restore_order(*owned[s]):
            copies += [WeightCopy(ranks[s], dst, region) for dst in ranks if dst != ranks[s]]
    return copies


def run(
    copies: Sequence[WeightCopy], me: int, arena: WeightArena, transport: StageTransport
) -> int:
    """Posts every copy this rank sends or receives as one batch (both directions of each
    link at once, :meth:`StageTransport.exchange`) and waits for it; a received region is
    written through its arena view (mapped: held, or a lazy alias). Returns the bytes
    received."""
    sends = [(c.dst_rank, _bytes(arena, c.region)) for c in copies if c.src_rank == me]
    recvs = [(c.src_rank, _bytes(arena, c.region)) for c in copies if c.dst_rank == me]
    transport.exchange(sends, recvs)
    return sum(t.numel() for _, t in recvs)


def _bytes(arena: WeightArena, region: int) -> torch.Tensor:
    return arena.layer_bytes(region, region + 1)


class WeightPrefetch:
    """The leader's schedule of a restore's weight copies while the group still serves.

    ``copies`` in :func:`plan_restore`'s order; ``nbytes(region)`` the bytes of a region;
    ``bytes_per_step`` how much each link direction (a sender and receiver pair) carries per
    step, at least one region. ``first_tail_block``: the lowest group-pool id whose bytes may
    lie past some stage's normal KV bytes (in the tail a drop lent); nothing may be copied until
    the leader has fenced ids from there on (``GroupKVManager.fence``)."""

    def __init__(
        self,
        copies: Sequence[WeightCopy],
        nbytes: Callable[[int], int],
        bytes_per_step: int,
        first_tail_block: int,
    ) -> None:
        self.pending = list(copies)
        self.done: list[WeightCopy] = []
        self.nbytes = nbytes
        self.bytes_per_step = bytes_per_step
        self.first_tail_block = first_tail_block
        self.steps = 0
        """Steps that carried copies."""

    @property
    def bytes_left(self) -> int:
        """Bytes not copied yet, over every link."""
        return sum(self.nbytes(c.region) for c in self.pending)

    def take(self) -> list[WeightCopy]:
        """The next step's copies (moved to ``done``, which the split then skips): the pending
        ones in order, while each link's bytes stay within the budget (every link gets at
        least one region). The order of the taken copies is the plan's."""
        used: dict[tuple[int, int], int] = {}
        full: set[tuple[int, int]] = set()  # links whose budget a region overran this step
        taken, left = [], []
        for c in self.pending:
            link = (c.src_rank, c.dst_rank)
            size = self.nbytes(c.region)
            if link in full or (link in used and used[link] + size > self.bytes_per_step):
                full.add(link)  # later regions of this link wait too (plan order)
                left.append(c)
                continue
            used[link] = used.get(link, 0) + size
            taken.append(c)
        self.pending, self.done = left, self.done + taken
        self.steps += bool(taken)
        return taken
