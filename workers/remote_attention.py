"""Pre-drop requests in a pipeline group: remote attention and the live KV exchange.

DESIGN.md §6.4-6.5; KunServe v1's remote attention and "lively exchanging KVCache with
incomplete parameters" (reference/kunserve.md §3(b)). At a drop, a request that was running
keeps its KV where it is: all L layers, in L-layer blocks on its home worker (DESIGN.md §5:
blocks keep their format until their KV has moved). It keeps decoding with no stall:

- **Remote attention.** At a layer ``j`` whose KV has not moved yet, the stage that owns layer
  ``j``'s weights computes q, k, v for the request's tokens and sends them to the home worker,
  which rotates them, appends k, v to its L-layer blocks at layer ``j``, computes attention and
  sends the output back (:class:`RemoteAttention`). On the home worker's own stage the same
  attention runs locally over the L-layer view.
- **Live KV exchange.** Each step, the leader moves a budget of layer slices of pre-drop
  requests from their home to the stage that owns those layers, in global layer order
  (:meth:`GroupKVManager.plan_exchange`); every stage runs the step's copies before its compute
  (:func:`~workers.kv_exchange.move`, in chunks), so the request's
  layers ``< moved_upto`` then attend locally, in pipeline blocks. When every layer has moved,
  its L-layer blocks are given back to the group pool.

- **Live gather (a restore).** The reverse, while the group still serves (KunServe §3(d) step
  4, "converts pipeline requests back, a batch at a time"): once a restore begins
  (:meth:`GroupKVManager.begin_gather`), each step moves a budget of requests' slices from every
  stage into L-layer blocks on one home (its origin when they fit there, else the member with
  the most room), inside the home's normal-mode blocks; from that step the request is a
  pre-drop request again and decodes through remote attention. When no request is left in
  pipeline blocks, the split copies no KV: every request's KV is already home.

Block accounting (the group pool has one id space for every stage): while a pre-drop request
holds L-layer block ``b`` on its home of ``L_h`` stage layers, the stage-view ids that alias
those bytes there, ``[floor(b·L/L_h), ceil((b+1)·L/L_h))``, are reserved in the group pool
(:meth:`GroupKVManager.adopt_legacy`). A pre-drop request gets pipeline blocks when its first
layer moves. A step that would write past its L-layer blocks moves every remaining layer first
(and, when the pool cannot give the pipeline blocks, the scheduler preempts as for any
allocation that fails); only while a restore gathers does it get more L-layer blocks on its home
instead, when they are free there.

The leader sends every stage a :class:`StepPlan` with the step (workers/pipeline.py), so every
worker knows which rows are remote at which layer, which home serves them, and in which order:
a stage at layer ``j`` sends q, k, v to each home in rank order, and each home serves the
stages before its own (before the step's activations reach it) and after (once it has sent
them on), layer by layer. All point-to-point messages of a pair are issued in one order on
both sides, so gloo and NCCL match them.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from attention.backends import AttentionBackend
from attention.metadata import AttentionMetadata, host_tensor
from attention.transport import StageTransport, pickled, unpickled
from workers.block_pool import BlockPool, KVCacheManager
from workers.kv_exchange import SliceCopy
from workers.request import Request
from workers.scheduler import SchedulerOutput
from workers.weight_exchange import WeightCopy

logger = logging.getLogger(__name__)


@dataclass
class LegacyKV:
    """A pre-drop request's KV that has not fully moved: layers ``>= moved_upto`` live in
    ``blocks`` (L-layer blocks) on the worker of rank ``home``."""

    request: Request
    home: int
    blocks: tuple[int, ...]
    reserved: list[int]
    """Group-pool ids reserved because they alias ``blocks`` on ``home``."""
    moved_upto: int = 0


@dataclass(frozen=True)
class LegacySeq:
    """One pre-drop sequence of a micro-batch, as every stage sees it in a StepPlan."""

    index: int
    """Its position among the micro-batch's sequences."""
    home: int
    moved_upto: int
    blocks: tuple[int, ...]


@dataclass(frozen=True)
class StepPlan:
    """What every stage must know of one step beyond its activations: this step's KV moves
    (run before the compute) and the micro-batch's pre-drop sequences."""

    moves: tuple[SliceCopy, ...] = ()
    """Forward exchange: L-layer slices on a home into the owner stage's pipeline blocks."""
    legacy: tuple[LegacySeq, ...] = ()
    query_lens: tuple[int, ...] = ()
    """Tokens of each sequence of the micro-batch this step."""
    seq_lens: tuple[int, ...] = ()
    """Context of each sequence including this step's tokens."""
    gathers: tuple[SliceCopy, ...] = ()
    """A live restore's gather: pipeline-block slices on each stage into L-layer blocks on
    a home (run after ``moves``)."""
    weights: tuple[WeightCopy, ...] = ()
    """A live restore's weight refill: regions back from the stage that kept them, into the
    KV tail the drop lent (run after ``gathers``; workers/weight_exchange.py)."""

    def encode(self, device: torch.device) -> torch.Tensor:
        """The plan as a uint8 tensor on ``device`` (sent after the step header)."""
        return pickled(self, device)

    @classmethod
    def decode(cls, t: torch.Tensor) -> StepPlan:
        plan = unpickled(t)
        if not isinstance(plan, cls):
            raise TypeError(f"expected a StepPlan, got {type(plan).__name__}")
        return plan


@dataclass(frozen=True)
class GroupLayout:
    """A pipeline group's stages: global ranks in stage order, each stage's layers."""

    ranks: tuple[int, ...]
    ranges: tuple[tuple[int, int], ...]

    @property
    def num_layers(self) -> int:
        return self.ranges[-1][1]

    def stage_of_rank(self, rank: int) -> int:
        return self.ranks.index(rank)

    def stage_layers(self, rank: int) -> int:
        start, end = self.ranges[self.stage_of_rank(rank)]
        return end - start


class GroupKVManager(KVCacheManager):
    """The leader's KV manager in pipeline mode: the group pool's pipeline blocks, plus the
    pre-drop requests' L-layer blocks until their KV has moved (module docstring).

    ``layer_block_bytes`` is the bytes of one layer of one block (K and V);
    ``exchange_bytes_per_step`` bounds the KV the exchange moves per step over each
    worker's link, each way (:class:`_LinkBudget`; at least one layer of one request moves
    each step while any is left).
    """

    def __init__(
        self,
        pool: BlockPool,
        block_size: int,
        layout: GroupLayout,
        layer_block_bytes: int,
        exchange_bytes_per_step: int,
    ) -> None:
        super().__init__(pool, block_size)
        self.layout = layout
        self.layer_block_bytes = layer_block_bytes
        self.exchange_bytes_per_step = exchange_bytes_per_step
        self.legacy: dict[str, LegacyKV] = {}
        self._must_move: set[str] = set()
        self.gather_homes: dict[int, int] | None = None
        """While a restore gathers KV (:meth:`begin_gather`): each member's L-layer blocks in
        normal mode, where gathered KV must lie; None otherwise."""
        self.origins: dict[str, int | None] = {}
        self._moved_now: set[str] = set()
        """Requests whose KV the last :meth:`plan_exchange` moved forward."""
        self.fenced: list[int] = []
        """Ids reserved by :meth:`fence` (a restore refills weights in the KV tail)."""

    # --- bookkeeping ----------------------------------------------------------------------

    def reserved_ids(self, home: int, blocks: Sequence[int]) -> list[int]:
        """Group-pool ids that alias L-layer ``blocks`` in the stage view of ``home``,
        ascending (at C speed: a drop reserves every running request's blocks while the
        engines are parked, 100k blocks when the KV cache is full)."""
        return self._reserved_many([home], [blocks])[0].tolist()

    def _reserved_many(
        self, homes: Sequence[int], block_lists: Sequence[Sequence[int]]
    ) -> tuple[np.ndarray, list[int]]:
        """:meth:`reserved_ids` of each (home, L-layer blocks), in one pass at C speed over
        all their blocks: the ids as one int64 array, each list's ascending and in list
        order, and the list boundaries in it ([len(homes) + 1]: list i is
        ``ids[bounds[i]:bounds[i + 1]]``)."""
        n, size = len(homes), self.pool.num_blocks
        lens = np.fromiter(map(len, block_lists), dtype=np.int64, count=n)
        b = np.fromiter(itertools.chain.from_iterable(block_lists), np.int64, int(lens.sum()))
        stage_layers = [self.layout.stage_layers(h) for h in homes]
        lh = np.repeat(np.asarray(stage_layers, dtype=np.int64), lens)
        L = self.layout.num_layers
        lo, hi = b * L // lh, -(-(b + 1) * L // lh)  # block b's bytes: stage ids [lo, hi)
        counts = hi - lo
        ids = np.arange(int(counts.sum())) + np.repeat(lo - (np.cumsum(counts) - counts), counts)
        owner = np.repeat(np.repeat(np.arange(n, dtype=np.int64), lens), counts)
        keep, scale = ids < size, max(1, size)
        key = owner[keep] * scale + ids[keep]
        # by list, then id: each list's ids ascending, each once (uneven stages share ids).
        # Ascending blocks give ascending keys, checked first: a sort costs ~10 ms at 200k
        # ids, and np.unique (hashing, numpy 2.4) ~100 ms
        if key.size > 1 and not (key[1:] > key[:-1]).all():
            key = np.sort(key)
            key = key[np.concatenate(([True], key[1:] != key[:-1]))]
        owner = key // scale
        bounds = np.searchsorted(owner, np.arange(n + 1)).tolist()
        return key - owner * scale, bounds

    def adopt_legacy(self, request: Request, home: int) -> None:
        """Takes a running request whose ``block_ids`` are L-layer blocks on ``home``: they
        become its legacy blocks (reserved in the group pool) and it holds no pipeline block."""
        self.adopt_all([(request, home)])

    def adopt_all(self, requests: Sequence[tuple[Request, int]]) -> None:
        """:meth:`adopt_legacy` for each (request, home), their ids found and reserved at
        once (a drop adopts every running request while the engines are parked: about 100k
        blocks when the KV cache is full)."""
        if not requests:
            return
        homes, blocks = [home for _, home in requests], [r.block_ids for r, _ in requests]
        ids, bounds = self._reserved_many(homes, blocks)
        self.pool.reserve(ids)
        flat = ids.tolist()
        for i, (request, home) in enumerate(requests):
            blocks = tuple(request.block_ids)
            reserved = flat[bounds[i] : bounds[i + 1]]
            self.legacy[request.request_id] = LegacyKV(request, home, blocks, reserved)
            request.block_ids = []
            logger.debug(
                "request %s: pre-drop KV stays on worker %d (L-layer blocks %s)",
                request.request_id,
                home,
                blocks,
            )

    def allocate_slots(self, request: Request, num_new_tokens: int) -> list[int] | None:
        lg = self.legacy.get(request.request_id)
        if lg is None:
            return super().allocate_slots(request, num_new_tokens)
        tokens = request.num_computed_tokens + num_new_tokens
        if tokens > len(lg.blocks) * self.block_size and self._grow_home(lg, tokens):
            return []
        if tokens > len(lg.blocks) * self.block_size:
            new = super().allocate_slots(request, num_new_tokens)
            if new is not None:
                self._must_move.add(request.request_id)
            return new
        if request.block_ids:  # moving: the moved layers write to its pipeline blocks
            return super().allocate_slots(request, num_new_tokens)
        return []

    def free(self, request: Request) -> None:
        super().free(request)
        self._release(request.request_id)

    def _release(self, rid: str) -> None:
        self._release_all([rid])

    def _release_all(self, rids: Sequence[str]) -> None:
        """Forgets these pre-drop requests' L-layer blocks and frees their reservations, all
        in one call (in order: the free list takes them as one request after another)."""
        freed: list[int] = []
        for rid in rids:
            lg = self.legacy.pop(rid, None)
            self._must_move.discard(rid)
            if lg is not None:
                freed += lg.reserved
        self.pool.free(freed)

    @property
    def num_reserved(self) -> int:
        return sum(len(lg.reserved) for lg in self.legacy.values()) + len(self.fenced)

    def held_ids(self) -> list[int]:
        """Every reservation, the fence's included (ids may repeat across requests when layers
        split unevenly)."""
        return [i for lg in self.legacy.values() for i in lg.reserved] + self.fenced

    def _pipeline_refs(self) -> np.ndarray:
        """Per group-pool id, the references pipeline blocks hold (reservations taken out)."""
        held = self.pool.ref_count_array()
        np.subtract.at(held, self.held_ids(), 1)
        return held

    def fence(self, first: int) -> bool:
        """Reserves every id from ``first`` on (free or reserved), so no pipeline block is
        handed out there until :meth:`unfence`; False, reserving nothing, while a pipeline
        block from ``first`` on is held. A restore fences the ids whose bytes may lie in the KV
        tail a drop lent before it refills weights there (workers/weight_exchange.py).
        Fencing twice is a no-op."""
        if self.fenced:
            return True
        if np.any(self._pipeline_refs()[first:] > 0):
            return False
        self.fenced = list(range(first, self.pool.num_blocks))
        self.pool.reserve(self.fenced)
        logger.debug("fenced group blocks [%d, %d)", first, self.pool.num_blocks)
        return True

    def unfence(self) -> None:
        """Gives the fenced ids back (a refused restore)."""
        fenced, self.fenced = self.fenced, []
        self.pool.free(fenced)

    # --- the exchange ---------------------------------------------------------------------

    def plan_exchange(
        self, out: SchedulerOutput | None, everything: bool = False
    ) -> list[SliceCopy]:
        """This step's KV moves, decided after scheduling ``out``: first every remaining layer
        of the requests that would write past their L-layer blocks, then, within the link's
        byte budget (:class:`_LinkBudget`; ``everything``: no budget), further layers of the
        others in admission order.
        Allocates pipeline blocks for requests whose first layer moves (skipping those the pool
        cannot hold), advances ``moved_upto``, and gives back the L-layer blocks of requests
        that have fully moved (their copies run this step, before any later allocation).
        Raises RuntimeError when ``everything`` is asked and the pool is short.

        ``everything`` leaves alone the requests none of whose layers has moved (their KV is
        whole on their home, where a restore keeps it). While a restore gathers
        (:meth:`begin_gather`), only the requests that must move go forward (the step's
        gather is :meth:`plan_gather`'s)."""
        gathering = self.gather_homes is not None and not everything
        self._moved_now = set()
        if not self.legacy:
            return []
        scheduled = {} if out is None else {s.request.request_id: s for s in out.scheduled}
        L = self.layout.num_layers
        link = _LinkBudget(self.layout, self.exchange_bytes_per_step)
        moves: list[tuple[Request, int, int, int]] = []  # request, first, end layer, blocks
        order = sorted(
            self.legacy.values(), key=lambda lg: lg.request.request_id not in self._must_move
        )
        for lg in order:
            r = lg.request
            n = self.blocks_needed(r.num_computed_tokens)
            must = r.request_id in self._must_move
            if (everything and lg.moved_upto == 0 and not must) or (gathering and not must):
                continue
            per_layer = max(1, n) * self.layer_block_bytes
            if everything or must:
                layers = L - lg.moved_upto
            else:
                layers = link.layers_within(lg.home, lg.moved_upto, per_layer)
                if layers == 0 and not moves:
                    layers = 1  # at least one layer a step
            if layers == 0:
                continue
            if not r.block_ids:  # its first move: pipeline blocks for what it holds
                s = scheduled.get(r.request_id)
                tokens = r.num_computed_tokens + (s.num_new_tokens if s else 0)
                ids = self.pool.allocate(self.blocks_needed(tokens))
                if ids is None:
                    if everything:
                        raise RuntimeError(f"{r.request_id}: no group blocks to move its KV into")
                    continue
                r.block_ids.extend(ids)
            link.spend(lg.home, lg.moved_upto, lg.moved_upto + layers, per_layer)
            moves.append((r, lg.moved_upto, lg.moved_upto + layers, n))
        done = []
        for r, a, b, _ in moves:
            lg = self.legacy[r.request_id]
            lg.moved_upto = b
            logger.debug(
                "request %s: KV of layers [%d, %d) moves from worker %d this step",
                r.request_id,
                a,
                b,
                lg.home,
            )
            if b == L:
                done.append(r.request_id)
        copies = self._copies(moves)
        self._release_all(done)
        for rid in done:
            logger.debug("request %s: all its KV has moved; L-layer blocks freed", rid)
        self._moved_now = {r.request_id for r, *_ in moves}
        return copies

    # --- the gather of a live restore ---------------------------------------------------

    def begin_gather(self, homes: dict[int, int], origins: dict[str, int | None]) -> None:
        """Starts gathering every request's KV onto one home (module docstring): ``homes``
        maps each member's rank to its L-layer blocks in normal mode, ``origins`` a request id
        to the rank that served it before the drop (None: it arrived after)."""
        if set(homes) != set(self.layout.ranks):
            raise ValueError(f"gather homes {sorted(homes)} are not the group {self.layout.ranks}")
        self.gather_homes = dict(homes)
        self.origins = dict(origins)
        logger.debug("gather begins: homes %s", homes)

    def end_gather(self) -> None:
        """Stops gathering (a refused restore): gathered requests stay pre-drop requests, and
        the forward exchange moves them again."""
        self.gather_homes = None

    def is_home(self, request_id: str) -> bool:
        """Whether all the request's KV is in L-layer blocks on one home (nothing to copy at a
        restore)."""
        lg = self.legacy.get(request_id)
        return lg is not None and lg.moved_upto == 0 and request_id not in self._must_move

    def _home_room(self) -> dict[int, np.ndarray]:
        """Per member rank, which of its normal-mode L-layer blocks a request may gather into
        now: none of a pre-drop request's blocks there, and no pipeline block on that
        member's stage view aliasing their bytes. Bool arrays [normal blocks of the member]."""
        L, size = self.layout.num_layers, self.pool.num_blocks
        held = self._pipeline_refs()  # reservations are not pipeline blocks
        used: dict[int, list[int]] = {rank: [] for rank in self.layout.ranks}
        for lg in self.legacy.values():
            used[lg.home] += lg.blocks
        sums = np.concatenate(([0], np.cumsum(held > 0)))
        room = {}
        for rank, n in self.gather_homes.items():
            lh, b = self.layout.stage_layers(rank), np.arange(n)
            lo = np.minimum(b * L // lh, size)
            hi = np.minimum(-(-(b + 1) * L // lh), size)
            free = sums[hi] - sums[lo] == 0
            free[[x for x in used[rank] if x < n]] = False
            room[rank] = free
        return room

    @staticmethod
    def _take(room: np.ndarray, count: int) -> list[int] | None:
        """``count`` blocks of ``room`` (lowest first), marked taken there; None when fewer
        are free (nothing taken)."""
        if count <= 0:
            return []
        ids = np.flatnonzero(room)[:count]
        if len(ids) < count:
            return None
        room[ids] = False
        return [int(x) for x in ids]

    def _grow_home(self, lg: LegacyKV, tokens: int) -> bool:
        """While gathering: gives ``lg`` more L-layer blocks on its home for ``tokens``
        tokens (reserving their aliases); False, changing nothing, when the home is full."""
        if self.gather_homes is None or lg.moved_upto != 0:
            return False
        room = self._home_room()[lg.home]
        extra = self._take(room, self.blocks_needed(tokens) - len(lg.blocks))
        if extra is None:
            return False
        self._extend(lg, extra)
        return True

    def _extend(self, lg: LegacyKV, blocks: list[int]) -> None:
        """Gives ``lg`` more L-layer blocks on its home, reserving the group-pool ids that
        alias them."""
        reserved = self.reserved_ids(lg.home, blocks)
        self.pool.reserve(reserved)
        lg.blocks += tuple(blocks)
        lg.reserved += reserved

    def plan_gather(self, out: SchedulerOutput) -> list[SliceCopy]:
        """While gathering (:meth:`begin_gather`; else no copies), this step's gather, decided
        after :meth:`plan_exchange`: within the byte budget (at least one request a step), in
        admission order, the scheduled requests with KV in pipeline blocks (but none moving
        forward this step) get L-layer blocks on a home for the tokens they hold after this
        step; every stage's slices of their KV go there (copies from stage views into L-layer
        views, run before the step's compute); their pipeline blocks are given back. A request
        whose home has no room waits for a later step."""
        if self.gather_homes is None:
            return []
        skip = self._moved_now
        budget, L = self.exchange_bytes_per_step, self.layout.num_layers
        room = self._home_room()  # pipeline blocks are given back only after the loop
        moves = []  # (request, home, L-layer blocks, blocks holding KV, layers [0, upto) move)
        for s in out.scheduled:
            r, rid = s.request, s.request.request_id
            lg = self.legacy.get(rid)
            if rid in skip or rid in self._must_move or not r.block_ids:
                continue
            if lg is not None and lg.moved_upto == 0:
                continue
            upto = L if lg is None else lg.moved_upto
            n = self.blocks_needed(r.num_computed_tokens)
            cost = upto * n * self.layer_block_bytes
            if moves and cost > budget:
                break
            need = self.blocks_needed(r.num_computed_tokens + s.num_new_tokens)
            home = self._gather_home(rid, need, room) if lg is None else lg.home
            have = 0 if lg is None else len(lg.blocks)
            blocks = None if home is None else self._take(room[home], need - have)
            if blocks is None:
                continue
            budget -= cost
            moves.append((r, home, blocks, n, upto))
        copies: list[SliceCopy] = []
        for r, home, blocks, n, upto in moves:
            lg = self.legacy.get(r.request_id)
            if lg is None:
                lg = LegacyKV(r, home, (), [], moved_upto=upto)
                self.legacy[r.request_id] = lg
            self._extend(lg, blocks)  # no pipeline block aliases them (``_home_room``)
            copies += self._gather_copies(lg, n, upto)
            self.pool.free(list(reversed(r.block_ids)))
            r.block_ids = []
            lg.moved_upto = 0
            logger.debug(
                "request %s: KV of layers [0, %d) gathers onto worker %d (L-layer blocks %s)",
                r.request_id,
                upto,
                home,
                list(lg.blocks),
            )
        return _merged(copies)

    def _gather_home(self, rid: str, blocks: int, room: dict[int, np.ndarray]) -> int | None:
        """The request's origin when ``blocks`` L-layer blocks are free there, else the member
        with the most free (None when none has them)."""
        free = {h: int(np.count_nonzero(room[h])) for h in self.layout.ranks}
        origin = self.origins.get(rid)
        if origin in free and free[origin] >= blocks:
            return origin
        best = max(free, key=lambda h: (free[h], -h))
        return best if free[best] >= blocks else None

    def _gather_copies(self, lg: LegacyKV, n: int, upto: int) -> list[SliceCopy]:
        """Layers ``[0, upto)`` of the first ``n`` blocks, from each stage's pipeline blocks
        into ``lg``'s L-layer blocks on its home."""
        r, copies = lg.request, []
        for rank, (start, end) in zip(self.layout.ranks, self.layout.ranges, strict=True):
            hi = min(end, upto)
            if n == 0 or start >= hi:
                continue
            copies.append(
                SliceCopy(
                    src_rank=rank,
                    dst_rank=lg.home,
                    src_layers=(0, hi - start),
                    dst_layers=(start, hi),
                    src_blocks=tuple(r.block_ids[:n]),
                    dst_blocks=lg.blocks[:n],
                    request_ids=(r.request_id,),
                )
            )
        return copies

    def _copies(self, moves: list[tuple[Request, int, int, int]]) -> list[SliceCopy]:
        """SliceCopies of the moves, one per (home, owner stage, layer span), requests merged."""
        copies = []
        for r, a, b, n in moves:
            if n == 0:
                continue
            lg = self.legacy[r.request_id]
            for rank, (start, end) in zip(self.layout.ranks, self.layout.ranges, strict=True):
                lo, hi = max(a, start), min(b, end)
                if lo < hi:
                    copies.append(
                        SliceCopy(
                            src_rank=lg.home,
                            dst_rank=rank,
                            src_layers=(lo, hi),
                            dst_layers=(lo - start, hi - start),
                            src_blocks=tuple(lg.blocks[:n]),
                            dst_blocks=tuple(r.block_ids[:n]),
                            request_ids=(r.request_id,),
                        )
                    )
        return _merged(copies)

    def step_plan(
        self,
        out: SchedulerOutput,
        moves: Sequence[SliceCopy],
        gathers: Sequence[SliceCopy] = (),
        weights: Sequence[WeightCopy] = (),
    ) -> StepPlan | None:
        """The plan every stage gets with this step; None when it has no moves, no gathers,
        no weight copies and no pre-drop sequence (a plain pipeline step)."""
        legacy = []
        for i, s in enumerate(out.scheduled):
            lg = self.legacy.get(s.request.request_id)
            if lg is not None:
                legacy.append(LegacySeq(i, lg.home, lg.moved_upto, lg.blocks))
        if not legacy and not moves and not gathers and not weights:
            return None
        q = tuple(s.num_new_tokens for s in out.scheduled)
        c = tuple(s.request.num_computed_tokens + s.num_new_tokens for s in out.scheduled)
        return StepPlan(tuple(moves), tuple(legacy), q, c, tuple(gathers), tuple(weights))


class _LinkBudget:
    """One live step's exchange budget, per direction of each worker's link: the bytes each
    worker sends, and each receives, may not pass ``budget``. A request's layers that its
    own home's stage keeps are copied within that worker, at memory speed beside the link
    (a side stream, workers/kv_exchange.py), and are not counted: on 2 H200s the link moves
    ~1 GiB in ~4 ms, where a copy within one H200's memory (4.8 TB/s) reads and writes as
    much in about 0.5 ms. Counting them had halved the budget: a drop bench whose pre-drop
    KV (about 3.4 GiB, half of it local) passed the measured budget (3.2 GiB) left two
    requests on remote attention, a 37 ms first step."""

    def __init__(self, layout: GroupLayout, budget: int) -> None:
        self.layout, self.budget = layout, max(0, budget)
        self.sent: Counter = Counter()
        self.received: Counter = Counter()

    def _crossing(self, home: int, a: int, b: int) -> list[tuple[int, int]]:
        """(owner rank, layer count) of layers ``[a, b)`` of a request homed on ``home`` that
        other stages own: what crosses the link if they move."""
        out = []
        for rank, (start, end) in zip(self.layout.ranks, self.layout.ranges, strict=True):
            k = min(b, end) - max(a, start)
            if rank != home and k > 0:
                out.append((rank, k))
        return out

    def layers_within(self, home: int, first: int, per_layer: int) -> int:
        """The most layers from ``first`` on that a request homed on ``home`` may move
        (``per_layer`` bytes each) within what is left of the budget; 0 when none. One pass
        over the stages (a drop at full KV plans hundreds of requests a step)."""
        sent, moved = self.sent[home], 0
        for rank, (start, end) in zip(self.layout.ranks, self.layout.ranges, strict=True):
            k = end - max(first, start)
            if k <= 0:
                continue
            if rank != home:
                room = min(self.budget - sent, self.budget - self.received[rank]) // per_layer
                if room < k:
                    return moved + max(0, room)
                sent += per_layer * k
            moved += k
        return moved

    def spend(self, home: int, a: int, b: int, per_layer: int) -> None:
        """Counts layers ``[a, b)`` of a request homed on ``home`` as moved this step."""
        for rank, k in self._crossing(home, a, b):
            self.sent[home] += per_layer * k
            self.received[rank] += per_layer * k


def _merged(copies: list[SliceCopy]) -> list[SliceCopy]:
    """One copy per (source, destination, layer spans), blocks and requests concatenated in
    order (fewer, larger messages); linear in the blocks."""
    groups: dict[tuple, list[SliceCopy]] = {}
    for c in copies:
        groups.setdefault((c.src_rank, c.dst_rank, c.src_layers, c.dst_layers), []).append(c)
    return [
        cs[0]
        if len(cs) == 1
        else dataclasses.replace(
            cs[0],
            src_blocks=tuple(itertools.chain.from_iterable(c.src_blocks for c in cs)),
            dst_blocks=tuple(itertools.chain.from_iterable(c.dst_blocks for c in cs)),
            request_ids=tuple(itertools.chain.from_iterable(c.request_ids for c in cs)),
        )
        for cs in groups.values()
    ]


# --- attention for a step with pre-drop sequences --------------------------------------------


@dataclass
class _Rows:
    """Sequences of one micro-batch (their indices) and their token rows."""

    seqs: list[int]
    rows: torch.Tensor = field(repr=False)


class RemoteAttention:
    """One stage's attention router for one step with pre-drop sequences, and its server for
    the other stages' remote attention of the sequences homed here (module docstring).

    ``legacy_view`` is this worker's KV bytes as L-layer blocks
    ``[num_blocks, L, 2, block_size, num_kv_heads, head_dim]``; ``cos_sin_cache`` the RoPE table.
    """

    def __init__(
        self,
        plan: StepPlan,
        me: int,
        layout: GroupLayout,
        legacy_view: torch.Tensor,
        transport: StageTransport,
        backend: AttentionBackend,
        cos_sin_cache: torch.Tensor,
        head_shape: tuple[int, int, int],
        counters: Counter | None = None,
    ) -> None:
        self.counters = Counter() if counters is None else counters
        """``sent``: layer calls this stage sent to a remote home; ``served``: layer calls it
        served as a home; ``home``: layers of pre-drop rows homed here computed locally."""
        self.plan = plan
        self.me = me
        self.layout = layout
        self.view = legacy_view
        self.transport = transport
        self.backend = backend
        self.cos_sin_cache = cos_sin_cache
        self.num_heads, self.num_kv_heads, self.head_dim = head_shape
        self.device = legacy_view.device
        self.block_size = legacy_view.shape[3]
        qsl = [0]
        for n in plan.query_lens:
            qsl.append(qsl[-1] + n)
        self.qsl = qsl
        self.by_index = {s.index: s for s in plan.legacy}
        self.start = layout.ranges[layout.stage_of_rank(me)][0]
        # Per step, each set of sequences is looked up once: a layer's host-to-device copies
        # of rows, positions and metadata are reused by every later layer with the same set.
        self._meta_cache: dict[tuple[int, ...], AttentionMetadata] = {}
        self._rows_cache: dict[tuple[int, ...], _Rows] = {}
        self._positions_cache: dict[tuple[int, ...], torch.Tensor] = {}
        self._select_cache: dict[tuple[int, ...], AttentionMetadata] = {}

    # --- which rows go where ---------------------------------------------------------------

    def _rows(self, seqs: list[int]) -> _Rows:
        key = tuple(seqs)
        if key not in self._rows_cache:
            rows = [t for i in seqs for t in range(self.qsl[i], self.qsl[i + 1])]
            tensor = host_tensor(rows, torch.int64, self.device)
            self._rows_cache[key] = _Rows(seqs, tensor)
        return self._rows_cache[key]

    def remote_seqs(self, layer: int) -> dict[int, list[int]]:
        """Home rank -> sequences whose KV of ``layer`` is still on that home."""
        out: dict[int, list[int]] = {}
        for s in self.plan.legacy:
            if s.moved_upto <= layer:
                out.setdefault(s.home, []).append(s.index)
        return out

    def _legacy_meta(self, seqs: list[int]) -> AttentionMetadata:
        """Attention metadata of ``seqs`` over their L-layer blocks (this worker is home)."""
        key = tuple(seqs)
        if key not in self._meta_cache:
            bs, slots = self.block_size, []
            for i in seqs:
                blocks = self.by_index[i].blocks
                end, n = self.plan.seq_lens[i], self.plan.query_lens[i]
                slots += [blocks[p // bs] * bs + p % bs for p in range(end - n, end)]
            self._meta_cache[key] = AttentionMetadata.from_host(
                slots,
                [list(self.by_index[i].blocks) for i in seqs],
                [self.plan.query_lens[i] for i in seqs],
                [self.plan.seq_lens[i] for i in seqs],
                self.device,
            )
        return self._meta_cache[key]

    def _positions(self, seqs: list[int]) -> torch.Tensor:
        key = tuple(seqs)
        if key not in self._positions_cache:
            pos = []
            for i in seqs:
                end, n = self.plan.seq_lens[i], self.plan.query_lens[i]
                pos += range(end - n, end)
            self._positions_cache[key] = host_tensor(pos, torch.int64, self.device)
        return self._positions_cache[key]

    def _packed_width(self) -> int:
        """Columns of one token's packed q, k, v (see :meth:`_unpack`)."""
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim

    def _unpack(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[n, (H + 2·Hkv)·D] (one message per layer and home) -> contiguous q [n, H, D],
        k and v [n, Hkv, D]."""
        n, d = qkv.shape[0], self.head_dim
        q, k, v = qkv.split(
            [self.num_heads * d, self.num_kv_heads * d, self.num_kv_heads * d], dim=1
        )
        return (
            q.reshape(n, self.num_heads, d).contiguous(),
            k.reshape(n, self.num_kv_heads, d).contiguous(),
            v.reshape(n, self.num_kv_heads, d).contiguous(),
        )

    def _attend_home(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqs: list[int]
    ) -> torch.Tensor:
        """Attention of ``seqs`` (homed here) at global ``layer`` over the L-layer blocks."""
        meta = self._legacy_meta(seqs)
        q, _ = self.backend.rope_and_write_kv(
            q, k, v, self._positions(seqs), self.cos_sin_cache, self.view, layer, meta.slot_mapping
        )
        return self.backend.attention(q, self.view, layer, meta)

    # --- the stage that owns the layer ------------------------------------------------------

    def attend(
        self,
        local_layer: int,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim], before RoPE
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim], before RoPE
        v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        positions: torch.Tensor,  # [num_tokens] int64
        kv_cache: torch.Tensor,  # this stage's view [num_blocks, L_r, 2, bs, Hkv, D]
        meta: AttentionMetadata,  # the micro-batch's pipeline metadata
    ) -> torch.Tensor:
        """Attention output [num_tokens, num_heads, head_dim] of the micro-batch at this
        stage's ``local_layer``: pipeline rows locally, pre-drop rows at their home (here or
        remote)."""
        layer = self.start + local_layer
        remote = self.remote_seqs(layer)
        legacy = {i for seqs in remote.values() for i in seqs}
        local = [i for i in range(len(self.plan.query_lens)) if i not in legacy]
        out = torch.empty_like(q)
        sent = []
        for home in sorted(remote):
            if home == self.me:
                continue
            r = self._rows(remote[home])
            picked = [t.index_select(0, r.rows).flatten(1) for t in (q, k, v)]
            self.transport.send(home, torch.cat(picked, dim=1))
            sent.append((home, r))
            self.counters["sent"] += 1
        if local:
            r = self._rows(local)
            m = meta
            if len(local) < len(self.plan.query_lens):
                key = tuple(local)
                if key not in self._select_cache:
                    self._select_cache[key] = _select(meta, r, self.qsl, self.plan.seq_lens)
                m = self._select_cache[key]
            ql, _ = self.backend.rope_and_write_kv(
                q[r.rows],
                k[r.rows],
                v[r.rows],
                positions[r.rows],
                self.cos_sin_cache,
                kv_cache,
                local_layer,
                m.slot_mapping,
            )
            out[r.rows] = self.backend.attention(ql, kv_cache, local_layer, m)
        if self.me in remote:
            r = self._rows(remote[self.me])
            out[r.rows] = self._attend_home(layer, q[r.rows], k[r.rows], v[r.rows], r.seqs)
            self.counters["home"] += 1
        for home, r in sent:
            shape = (r.rows.numel(), self.num_heads, self.head_dim)
            out[r.rows] = self.transport.recv(home, shape, q.dtype)
        return out

    # --- the home worker --------------------------------------------------------------------

    def serve(self, stage: int, dtype: torch.dtype) -> int:
        """Serves stage ``stage``'s remote attention for the sequences homed here, layer by
        layer in its range; returns the layers served."""
        src = self.layout.ranks[stage]
        start, end = self.layout.ranges[stage]
        served = 0
        for layer in range(start, end):
            seqs = self.remote_seqs(layer).get(self.me)
            if not seqs:
                continue
            n = sum(self.plan.query_lens[i] for i in seqs)
            q, k, v = self._unpack(self.transport.recv(src, (n, self._packed_width()), dtype))
            self.transport.send(src, self._attend_home(layer, q, k, v, seqs))
            served += 1
        self.counters["served"] += served
        return served


def _select(
    meta: AttentionMetadata, r: _Rows, qsl: list[int], seq_lens: Sequence[int]
) -> AttentionMetadata:
    """The metadata of a subset of a micro-batch's sequences (``qsl``, ``seq_lens``: the
    micro-batch's, on the host)."""
    idx = host_tensor(r.seqs, torch.int64, meta.seq_lens.device)
    sub_qsl = [0]
    for i in r.seqs:
        sub_qsl.append(sub_qsl[-1] + qsl[i + 1] - qsl[i])
    return AttentionMetadata(
        slot_mapping=meta.slot_mapping.index_select(0, r.rows),
        block_tables=meta.block_tables.index_select(0, idx),
        seq_lens=meta.seq_lens.index_select(0, idx),
        query_start_loc=host_tensor(sub_qsl, torch.int32, idx.device),
        max_query_len=max(qsl[i + 1] - qsl[i] for i in r.seqs),
        max_seq_len=max(seq_lens[i] for i in r.seqs),
    )
