"""KV slice copies between the workers of a pipeline group.

KunServe §3(c)-(d) (reference/kunserve.md). Two users walk the same plans: the live exchange
after a drop (workers/remote_attention.py: a pre-drop request's layer slices move from its
home's L-layer blocks to the stages that own those layers, a budget per step), and a restore,
where each stage's slice of every request moves back into L-layer blocks on its new home while
the engines are parked (KunServe's blocking ``reshard`` mode).

A plan is a list of :class:`SliceCopy`, one per ordered (source, destination) worker pair, in
one global order that every worker walks: the sender gathers and sends, the receiver receives,
a local pair copies. At a restore the source and destination views may alias the same bytes
(one buffer re-viewed, DESIGN.md §5), so every slice is read into a scratch tensor first
(:func:`read`) and written only after the buffer has been re-viewed (:func:`write`). The live
steps' plans write no bytes they read, so :func:`move` copies them in place, a bounded chunk at
a time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from attention.metadata import host_tensor
from attention.transport import StageTransport
from kernels.block_copy import copy_block_slices, scatter_block_slices
from workers.stalls import PhaseClock


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
            # only the layers that move are gathered (half of an L-layer block when half move)
            data = _gather(c, 0, len(c.src_blocks), view)
            if c.dst_rank == me:
                pending.append((c, data))
            else:
                _require(transport).send(c.dst_rank, data)
        elif c.dst_rank == me:
            shape = (len(c.src_blocks), c.num_layers, *view.shape[2:])
            pending.append((c, _require(transport).recv(c.src_rank, shape, view.dtype)))
    return pending


MOVE_CHUNK_BYTES = 128 * 2**20
"""Most bytes :func:`move` sends in one message. Two rounds are in flight at once, so its
scratch is two chunks per peer and direction, however large the step's plan (a chunk received
in place needs none)."""


def move(
    plan: Sequence[SliceCopy],
    me: int,
    src_view: torch.Tensor,  # [num_blocks, layers, 2, bs, H, D] where the slices are now
    dst_view: torch.Tensor,  # [num_blocks, layers, 2, bs, H, D] where they go (same memory)
    transport: StageTransport | None,
    chunk_bytes: int = MOVE_CHUNK_BYTES,
    clock: PhaseClock | None = None,
) -> int:
    """Runs ``plan`` in place, for plans whose destinations alias none of their sources (the
    live exchange and a live restore's gather: workers/remote_attention.py gives them
    blocks no other copy of the step reads): each copy is cut into chunks of at most
    ``chunk_bytes`` (at least one block; on CUDA a local copy is one chunk, copied view to
    view with no scratch); round ``k`` posts the ``k``-th chunk of every
    (source, destination) pair as one batch (:meth:`~attention.transport.StageTransport
    .post_exchange`: both directions of a link at once). Every worker derives the same rounds
    from the same plan, so sends and receives match. A chunk whose destination is every
    layer of one ascending run of blocks is received in place, with no scratch and no write
    (the live exchange's pipeline blocks are usually allocated in a row).

    The rounds are pipelined: round ``k + 1`` is gathered and posted before round ``k``'s
    chunks are written. The first round is posted before the local copies are queued, so the
    link starts as early as the peer allows, and on CUDA the local copies run on a side
    stream, beside it (tools/device/exchange_probe.py times this against one NCCL batch of
    the same bytes). Every block id the call indexes with reaches the device in one copy.

    ``clock``: adds this call's host time to its phases ``ids`` (the block ids' copy),
    ``gather`` (the sent chunks' gathers and the receive buffers), ``post`` (posting the
    rounds), ``local`` (queueing the local copies) and ``write`` (waiting for the rounds and
    queueing the writes of what was not received in place).

    Returns the copies this rank took part in. Raises RuntimeError when a copy crosses
    workers and ``transport`` is None."""
    clock = clock or PhaseClock()
    pairs: dict[tuple[int, int], list[tuple[SliceCopy, int, int]]] = {}
    for c in plan:
        if me not in (c.src_rank, c.dst_rank):
            continue
        per_block = c.num_layers * src_view[0, 0].numel() * src_view.element_size()
        step = max(1, chunk_bytes // max(1, per_block))
        if c.src_rank == c.dst_rank and dst_view.device.type == "cuda":
            step = max(1, len(c.src_blocks))  # view to view, no scratch: one launch
        chunks = pairs.setdefault((c.src_rank, c.dst_rank), [])
        chunks += [
            (c, lo, min(lo + step, len(c.src_blocks))) for lo in range(0, len(c.src_blocks), step)
        ]
    local = pairs.pop((me, me), [])
    with clock.phase("ids"):
        ids = _ChunkIds(me, local, pairs, dst_view.device)
    if pairs:
        transport = _require(transport)
    in_flight = None  # the round posted last: (its wait, its receive buffers)
    side = None
    for k in range(max((len(v) for v in pairs.values()), default=0)):
        sends, recvs = [], []
        with clock.phase("gather"):
            for (src, dst), chunks in sorted(pairs.items()):
                if k >= len(chunks):
                    continue
                c, lo, hi = chunks[k]
                if src == me:
                    sends.append((dst, _gather(c, lo, hi, src_view, ids.src(c, lo))))
                else:
                    buf, in_place = _receive_buffer(c, lo, hi, dst_view)
                    recvs.append((src, buf, c, lo, hi, in_place))
        with clock.phase("post"):
            wait = transport.post_exchange(sends, [(src, buf) for src, buf, *_ in recvs])
        if k == 0:
            with clock.phase("local"):
                side = _copy_local(local, src_view, dst_view, ids)
        if in_flight is not None:
            with clock.phase("write"):
                _write_round(*in_flight, dst_view, ids)
        in_flight = (wait, recvs)
    if in_flight is not None:
        with clock.phase("write"):
            _write_round(*in_flight, dst_view, ids)
    else:  # no round: local copies only
        with clock.phase("local"):
            side = _copy_local(local, src_view, dst_view, ids)
    if side is not None:  # the step's compute, queued next, sees the local copies
        torch.cuda.current_stream(dst_view.device).wait_stream(side)
    return sum(1 for c in plan if me in (c.src_rank, c.dst_rank))


class _ChunkIds:
    """The block ids of every chunk a :func:`move` call gathers from or writes to, on the
    device through one copy (:func:`~attention.metadata.host_tensor`), instead of a copy per
    chunk and side. Each chunk's ids start 16 bytes apart from the others' (``ALIGN``
    int64s): Triton specializes a kernel on whether a pointer is 16-byte aligned, and the
    variants warmed up at start-up take aligned ids. An unaligned slice compiled the block
    copy anew in a drop's first step (2x H200: two compiles of ~113 ms)."""

    ALIGN = 2

    def __init__(
        self,
        me: int,
        local: list[tuple[SliceCopy, int, int]],
        pairs: dict[tuple[int, int], list[tuple[SliceCopy, int, int]]],
        device: torch.device,
    ) -> None:
        flat: list[int] = []
        self._at: dict[tuple[int, int, bool], tuple[int, int]] = {}

        def add(c: SliceCopy, lo: int, hi: int, src: bool) -> None:
            blocks = (c.src_blocks if src else c.dst_blocks)[lo:hi]
            flat.extend([0] * (-len(flat) % self.ALIGN))
            self._at[(id(c), lo, src)] = (len(flat), len(flat) + len(blocks))
            flat.extend(blocks)

        for c, lo, hi in local:
            add(c, lo, hi, True)
            add(c, lo, hi, False)
        for chunks in pairs.values():
            for c, lo, hi in chunks:
                add(c, lo, hi, c.src_rank == me)
        self._flat = host_tensor(flat, torch.int64, device) if flat else None

    def src(self, c: SliceCopy, lo: int) -> torch.Tensor:
        a, b = self._at[(id(c), lo, True)]
        return self._flat[a:b]

    def dst(self, c: SliceCopy, lo: int) -> torch.Tensor:
        a, b = self._at[(id(c), lo, False)]
        return self._flat[a:b]


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _copy_local(
    chunks: list[tuple[SliceCopy, int, int]],
    src_view: torch.Tensor,
    dst_view: torch.Tensor,
    ids: _ChunkIds,
) -> torch.cuda.Stream | None:
    """Runs the local copies: on CUDA queued on a side stream (after the current stream's
    work so far), so they overlap the link; returns that stream for the caller to join, or
    None when they ran on the current stream (CPU, or no copy)."""
    if not chunks or dst_view.device.type != "cuda":
        for c, lo, hi in chunks:
            data = _gather(c, lo, hi, src_view, ids.src(c, lo))
            _write(c, lo, hi, data, dst_view, ids.dst(c, lo))
        return None
    device = dst_view.device
    side = _SIDE_STREAMS.get(device)
    if side is None:
        side = _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # view to view, no scratch (kernels/block_copy.py)
        for c, lo, _ in chunks:
            src, dst = ids.src(c, lo), ids.dst(c, lo)
            copy_block_slices(src_view, src, c.src_layers, dst_view, dst, c.dst_layers)
    return side


def _receive_buffer(
    c: SliceCopy, lo: int, hi: int, dst_view: torch.Tensor
) -> tuple[torch.Tensor, bool]:
    """Where destination blocks ``[lo, hi)`` of ``c`` are received, and whether that is in
    place: the blocks themselves when they are one ascending run of ``dst_view``'s ids and
    the slice is every layer of them (the live exchange's usual case: a stage's pipeline
    blocks, allocated in a row), so the round needs no scratch and no write; else a new
    buffer for :func:`_write`."""
    dst = c.dst_blocks[lo:hi]
    whole = c.dst_layers == (0, dst_view.shape[1]) and dst_view.is_contiguous()
    if whole and all(b - a == 1 for a, b in zip(dst, dst[1:], strict=False)):
        return dst_view[dst[0] : dst[-1] + 1], True
    shape = (hi - lo, c.num_layers, *dst_view.shape[2:])
    return torch.empty(shape, dtype=dst_view.dtype, device=dst_view.device), False


def _write_round(
    wait: Callable[[], None], recvs: list, dst_view: torch.Tensor, ids: _ChunkIds
) -> None:
    """Waits for a posted round and writes what it received into scratch (a chunk received
    in place, :func:`_receive_buffer`, is already written)."""
    wait()
    for _, buf, c, lo, hi, in_place in recvs:
        if not in_place:
            _write(c, lo, hi, buf, dst_view, ids.dst(c, lo))


def _gather(
    c: SliceCopy, lo: int, hi: int, view: torch.Tensor, idx: torch.Tensor | None = None
) -> torch.Tensor:
    """Source blocks ``[lo, hi)`` of ``c``, its layers only: [hi - lo, layers, 2, bs, H, D].
    ``idx``: those block ids on ``view``'s device, if already there."""
    a, b = c.src_layers
    if idx is None:
        idx = host_tensor(c.src_blocks[lo:hi], torch.int64, view.device)
    return view[:, a:b].index_select(0, idx)


def _write(
    c: SliceCopy,
    lo: int,
    hi: int,
    data: torch.Tensor,
    view: torch.Tensor,
    ids: torch.Tensor | None = None,
) -> None:
    """``data`` ([hi - lo, layers, 2, bs, H, D]) into destination blocks ``[lo, hi)`` of
    ``c`` (``ids``: those block ids on ``view``'s device, if already there): on CUDA one
    contiguous run per block (kernels/block_copy.py: index assignment reached only
    ~0.75 TB/s of read and write on an H200), elsewhere index assignment."""
    a, b = c.dst_layers
    if ids is None:
        ids = host_tensor(c.dst_blocks[lo:hi], torch.int64, view.device)
    if view.device.type != "cuda":  # gloo workers: no Triton (its CPU interpreter is slow
        view[ids, a:b] = data  # and not thread-safe)
        return
    scatter_block_slices(data.contiguous(), view, ids, (a, b))


def write(pending: Pending, view: torch.Tensor) -> None:
    """Scatters the slices into ``view`` (this rank's next view), blocks and layers per copy."""
    for c, data in pending:
        _write(c, 0, len(c.dst_blocks), data, view)


def _require(transport: StageTransport | None) -> StageTransport:
    if transport is None:
        raise RuntimeError("this KV plan crosses workers but no transport was given")
    return transport
