"""Point-to-point tensor transport between the workers of a pipeline group.

Every tensor that crosses workers after a drop goes through :class:`StageTransport`: one
micro-batch's activations and attention metadata from stage r to stage r+1, the sampling rows'
logits from the last stage back to the leader, KV-cache slices during a drop or restore, and
weights during a restore (KunServe §3(b)-(d), reference/kunserve.md). It is a thin layer over
``torch.distributed`` send/recv, so the same code runs on gloo (CPU) and NCCL (GPU); shapes and
dtypes are explicit on both sides, and every send has its recv in this one file.

Ordering contract: the two ends of a pair issue the matching calls in the same order (gloo and
NCCL match point-to-point messages in order per peer). Empty tensors are never sent: both ends
know the shape, so both skip them.
"""

from __future__ import annotations

import contextlib
import enum
import math
import pickle
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.distributed as dist

from attention.metadata import AttentionMetadata, host_tensor

HEADER_LEN = 9
"""int64 fields in a step header (op, tokens, seqs, table width, sampling rows, max query
length, max sequence length, bytes of the step plan that follows, leading decodes)."""


class StageOp(enum.IntEnum):
    """What a header announces."""

    STEP = 1
    """One micro-batch follows."""
    STOP = 2
    """Pipeline mode ends: the receiving stage loop returns (after forwarding the stop)."""


@dataclass(frozen=True)
class StepHeader:
    """The fixed-size int64 header sent ahead of a micro-batch; it gives every shape."""

    op: StageOp
    num_tokens: int = 0
    num_seqs: int = 0
    table_width: int = 0
    """Block-table columns (blocks of the longest sequence)."""
    num_sampling: int = 0
    """Rows that sample a token (their logits go back to the leader)."""
    max_query_len: int = 0
    max_seq_len: int = 0
    plan_bytes: int = 0
    """Bytes of the pickled step plan sent right after the header (0: none; a plain step)."""
    num_decodes: int = 0
    """:attr:`AttentionMetadata.num_decodes` of the micro-batch."""

    def encode(self, device: torch.device) -> torch.Tensor:
        """The header as int64 [HEADER_LEN] on ``device``. On CUDA it goes through pinned
        memory without waiting: ``torch.tensor(..., device=cuda)`` from a list synchronizes
        the stream, which made the leader wait, at every launch, for the micro-batch before
        to finish stage 0 (no host work overlapped the GPU's)."""
        fields = [int(self.op), self.num_tokens, self.num_seqs, self.table_width]
        fields += [self.num_sampling, self.max_query_len, self.max_seq_len, self.plan_bytes]
        fields += [self.num_decodes]
        return host_tensor(fields, torch.int64, device)

    @classmethod
    def decode(cls, t: torch.Tensor) -> StepHeader:
        op, tokens, seqs, width, sampling, max_q, max_s, plan, decodes = t.tolist()
        return cls(StageOp(op), tokens, seqs, width, sampling, max_q, max_s, plan, decodes)


@dataclass
class StageInputs:
    """One micro-batch as a stage that is not the first receives it."""

    hidden: torch.Tensor | None  # [num_tokens, hidden_size] model dtype (None: not yet run)
    residual: torch.Tensor | None  # [num_tokens, hidden_size] model dtype
    positions: torch.Tensor  # [num_tokens] int64
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # [num_sampling] int64: rows of the sampling tokens

    def header(self) -> StepHeader:
        m = self.meta
        return StepHeader(
            op=StageOp.STEP,
            num_tokens=self.positions.shape[0],
            num_seqs=m.seq_lens.shape[0],
            table_width=m.block_tables.shape[1],
            num_sampling=self.logits_indices.shape[0],
            max_query_len=m.max_query_len,
            max_seq_len=m.max_seq_len,
            num_decodes=m.num_decodes,
        )

    def with_hidden(self, hidden: torch.Tensor, residual: torch.Tensor) -> StageInputs:
        return replace(self, hidden=hidden, residual=residual)


def _meta_layout(h: StepHeader) -> list[tuple[torch.dtype, tuple[int, ...]]]:
    """The packed metadata's fields, in order: the int64 ones first (positions, slot mapping,
    logits indices), then the int32 ones (block tables, sequence lengths, query start
    locations), so that every field starts aligned to its element size."""
    n, s = h.num_tokens, h.num_seqs
    return [
        (torch.int64, (n,)),
        (torch.int64, (n,)),
        (torch.int64, (h.num_sampling,)),
        (torch.int32, (s, h.table_width)),
        (torch.int32, (s,)),
        (torch.int32, (s + 1,)),
    ]


def meta_bytes(h: StepHeader) -> int:
    """Bytes of the packed metadata of the micro-batch that ``h`` announces."""
    return sum(math.prod(shape) * dtype.itemsize for dtype, shape in _meta_layout(h))


def pack_meta(x: StageInputs) -> torch.Tensor:
    """``x``'s positions, slot mapping, logits indices, block tables, sequence lengths and
    query start locations as one uint8 [meta_bytes] tensor on their device, each converted
    to its wire dtype (:func:`_meta_layout`) as it is copied into its slice.

    Copies, not ``torch.cat``: CUDA loads a kernel's module on its first launch, and the
    uint8 concatenation, launched nowhere else, loaded on the first pipelined step of a
    server's first drop: 18 ms of host time in that step (2x H200 profile, docs/benchmarks.md
    session 22), a token gap for every running request. A same-dtype copy is a memcpy; a
    fresh process's first packing takes 0.4 ms of host time this way, against 5.5-13.8 ms
    with the concatenation (session 23)."""
    m = x.meta
    fields = (x.positions, m.slot_mapping, x.logits_indices)
    fields += (m.block_tables, m.seq_lens, m.query_start_loc)
    h = x.header()
    packed = torch.empty(meta_bytes(h), dtype=torch.uint8, device=x.positions.device)
    for t, view in zip(fields, unpack_meta(packed, h), strict=True):
        view.copy_(t)
    return packed


def unpack_meta(packed: torch.Tensor, h: StepHeader) -> list[torch.Tensor]:
    """The fields of :func:`pack_meta`, as views into ``packed`` (uint8 [meta_bytes(h)]).
    Raises ValueError when its size is not the header's."""
    if packed.numel() != meta_bytes(h):
        raise ValueError(
            f"packed metadata has {packed.numel()} bytes, the header says {meta_bytes(h)}"
        )
    out, offset = [], 0
    for dtype, shape in _meta_layout(h):
        size = math.prod(shape) * dtype.itemsize
        out.append(packed[offset : offset + size].view(dtype).view(shape))
        offset += size
    return out


class StageTransport:
    """Send/recv of micro-batches, logits and raw tensors between global ranks.

    ``hidden_size`` and ``dtype`` fix the activation shapes; ``device`` is where received
    tensors land (the worker's device: CPU for gloo, its GPU for NCCL). Not thread-safe: one
    thread per worker uses it at a time (the engine thread in pipeline mode, a transition
    while the engine thread is parked).
    """

    def __init__(
        self,
        device: torch.device,
        hidden_size: int,
        dtype: torch.dtype,
        return_group: dist.ProcessGroup | None = None,
    ) -> None:
        self.device = device
        self.hidden_size = hidden_size
        self.dtype = dtype
        self.return_group = return_group
        """Process group (same ranks) that logits travel back to the leader on; None: the
        default group. With micro-batches in flight NCCL needs its own communicator for this
        direction: on one communicator the leader's send of micro-batch k+1 would queue on
        the stream ahead of its receive of k's logits, while the last stage's send of k's
        logits blocks its receive of k+1 (a cycle)."""
        self._deferred: list[tuple[dist.Work, torch.Tensor]] | None = None
        self._header_stream: torch.cuda.Stream | None = None

    @contextlib.contextmanager
    def deferred_sends(self) -> Iterator[list[tuple[dist.Work, torch.Tensor]]]:
        """Inside the block :meth:`send` posts ``isend`` and returns at once; the yielded list
        collects (work, tensor) pairs for :func:`wait_sends`. The leader launches a micro-batch
        so, and collects its logits before a later stage has taken its activations."""
        previous, self._deferred = self._deferred, []
        try:
            yield self._deferred
        finally:
            self._deferred = previous

    # --- micro-batches ------------------------------------------------------------------

    def send_step(self, dst: int, x: StageInputs) -> None:
        """Header, then the body (:meth:`send_body`)."""
        self.send(dst, x.header().encode(self.device))
        self.send_body(dst, x)

    def send_body(self, dst: int, x: StageInputs) -> None:
        """Hidden, residual, then the metadata packed into one buffer (:func:`pack_meta`),
        in that order (the receiver has the header). Three messages, not eight: each send and
        receive costs its host 50-75 us on NCCL, and a stage whose host is late posts them
        while its device waits (2x H200 profile, docs/benchmarks.md session 21)."""
        for t in (x.hidden, x.residual, pack_meta(x)):
            self.send(dst, t)

    def recv_step(self, src: int) -> StageInputs | None:
        """The next micro-batch from ``src``, or None when it sent STOP."""
        h = self.recv_header(src)
        if h.op is StageOp.STOP:
            return None
        return self.recv_body(src, h)

    def recv_body(self, src: int, h: StepHeader) -> StageInputs:
        """The body of the micro-batch that header ``h`` announced (:meth:`send_body`)."""
        hidden = self.recv(src, (h.num_tokens, self.hidden_size), self.dtype)
        residual = self.recv(src, (h.num_tokens, self.hidden_size), self.dtype)
        packed = self.recv(src, (meta_bytes(h),), torch.uint8)
        fields = unpack_meta(packed, h)
        positions, slot_mapping, logits_indices = fields[:3]
        block_tables, seq_lens, query_start_loc = fields[3:]
        meta = AttentionMetadata(
            slot_mapping=slot_mapping,
            block_tables=block_tables,
            seq_lens=seq_lens,
            query_start_loc=query_start_loc,
            max_query_len=h.max_query_len,
            max_seq_len=h.max_seq_len,
        ).with_decodes(h.num_decodes)
        return StageInputs(hidden, residual, positions, meta, logits_indices)

    def send_header(self, dst: int, h: StepHeader) -> None:
        self.send(dst, h.encode(self.device))

    def send_stop(self, dst: int) -> None:
        self.send(dst, StepHeader(StageOp.STOP).encode(self.device))

    def recv_header(self, src: int) -> StepHeader:
        """The next step header from ``src``. On CUDA it is received on a stream of its own
        and read back through pinned memory, so reading it waits for the header alone, not
        for the work queued before it on the current stream: a stage queues its next
        micro-batch while its device still computes the last one. Read on the current
        stream, the header waited for that micro-batch first, and the device idled while the
        host queued the next: on 2 H200s pipelined decode went from 0.86x to 1.00x of normal
        with this change (drop bench, docs/benchmarks.md session 19)."""
        if self.device.type != "cuda":
            return StepHeader.decode(self.recv(src, (HEADER_LEN,), torch.int64))
        if self._header_stream is None:
            self._header_stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(self._header_stream):
            t = self.recv(src, (HEADER_LEN,), torch.int64)
            host = torch.empty(HEADER_LEN, dtype=torch.int64, pin_memory=True)
            host.copy_(t, non_blocking=True)
        self._header_stream.synchronize()
        return StepHeader.decode(host)

    def send_logits(self, dst: int, logits: torch.Tensor) -> None:
        """``logits``: [num_sampling, vocab], from the last stage to the leader (on
        ``return_group``)."""
        self.send(dst, logits, self.return_group)

    def recv_logits(self, src: int, num_sampling: int, vocab_size: int) -> torch.Tensor:
        return self.recv(src, (num_sampling, vocab_size), self.dtype, self.return_group)

    # --- raw tensors (KV slices, weights) -------------------------------------------------

    def send(self, dst: int, t: torch.Tensor, group: dist.ProcessGroup | None = None) -> None:
        """Sends ``t`` (any shape and dtype, made contiguous) on ``group`` (None: the default);
        a no-op when it is empty. Inside :meth:`deferred_sends`, posts it and returns."""
        if t.numel() == 0:
            return
        t = t.contiguous()
        if self._deferred is None:
            dist.send(t, dst, group=group)
        else:
            self._deferred.append((dist.isend(t, dst, group=group), t))

    def recv(
        self,
        src: int,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        group: dist.ProcessGroup | None = None,
    ) -> torch.Tensor:
        """A new tensor of ``shape`` and ``dtype`` filled from ``src`` (empty: no message)."""
        out = torch.empty(shape, dtype=dtype, device=self.device)
        self.recv_into(src, out, group)
        return out

    def exchange(
        self,
        sends: Sequence[tuple[int, torch.Tensor]],
        recvs: Sequence[tuple[int, torch.Tensor]],
    ) -> None:
        """:func:`batch_exchange` on the default process group."""
        batch_exchange(sends, recvs)

    def post_exchange(
        self,
        sends: Sequence[tuple[int, torch.Tensor]],
        recvs: Sequence[tuple[int, torch.Tensor]],
    ) -> Callable[[], None]:
        """:func:`post_batch` on the default process group: posts the batch and returns at
        once; calling the result waits for it (on NCCL: the current stream waits, the host
        does not). Until then the tensors are in use, and the host may queue other work."""
        return post_batch(sends, recvs)

    def recv_into(
        self, src: int, out: torch.Tensor, group: dist.ProcessGroup | None = None
    ) -> None:
        """Fills the contiguous tensor ``out`` in place from ``src``; a no-op when empty."""
        if out.numel() == 0:
            return
        if not out.is_contiguous():
            raise ValueError("recv_into needs a contiguous tensor")
        dist.recv(out, src, group=group)


def pickled(obj: Any, device: torch.device) -> torch.Tensor:
    """``obj`` pickled, as uint8 [n] on ``device``; on CUDA through pinned memory, without
    waiting for the stream (as :meth:`StepHeader.encode`)."""
    raw = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    t = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


def unpickled(t: torch.Tensor) -> Any:
    """The object :func:`pickled` made ``t`` of."""
    return pickle.loads(t.cpu().numpy().tobytes())


def send_object(dst: int, obj: Any, device: torch.device) -> None:
    """Pickles ``obj`` to rank ``dst`` on the default process group, tensors made on
    ``device``: its length, then its bytes (:func:`recv_object` on ``dst``)."""
    data = pickled(obj, device)
    dist.send(host_tensor([data.numel()], torch.int64, device), dst)
    dist.send(data, dst)


def recv_object(src: int, device: torch.device) -> Any:
    """What :func:`send_object` sent from rank ``src``."""
    size = torch.zeros(1, dtype=torch.int64, device=device)
    dist.recv(size, src)
    data = torch.empty(int(size.item()), dtype=torch.uint8, device=device)
    dist.recv(data, src)
    return unpickled(data)


def wait_sends(sends: list[tuple[dist.Work, torch.Tensor]]) -> None:
    """Waits for sends posted under :meth:`StageTransport.deferred_sends` (their tensors
    stay alive until then)."""
    for work, _ in sends:
        work.wait()
    sends.clear()


_CONNECT_BYTES = (8, 1 << 16, 64 << 20)
"""Message sizes each pair exchanges at start-up on CUDA: NCCL connects a protocol's channels
(LL, LL128, Simple: chosen by size) on their first use, so each is used once here."""


def batch_exchange(
    sends: Sequence[tuple[int, torch.Tensor]],
    recvs: Sequence[tuple[int, torch.Tensor]],
    group: dist.ProcessGroup | None = None,
) -> None:
    """Sends each ``(dst, tensor)`` and fills each contiguous ``(src, tensor)`` in place, all
    posted as one batch (``batch_isend_irecv``: on NCCL one group, so a link carries both
    directions at once instead of one after the other), then waits for all. Per peer, sends
    match the peer's receives in list order. Empty tensors are skipped on both ends. Raises
    ValueError for a non-contiguous receive tensor."""
    post_batch(sends, recvs, group)()


def post_batch(
    sends: Sequence[tuple[int, torch.Tensor]],
    recvs: Sequence[tuple[int, torch.Tensor]],
    group: dist.ProcessGroup | None = None,
) -> Callable[[], None]:
    """:func:`batch_exchange`'s batch, posted: returns a function that waits for it (and
    keeps its tensors alive until then). Raises ValueError for a non-contiguous receive
    tensor, posting nothing."""
    ops = [dist.P2POp(dist.isend, t.contiguous(), dst, group) for dst, t in sends if t.numel()]
    for src, t in recvs:
        if not t.is_contiguous():
            raise ValueError("exchange needs contiguous receive tensors")
        if t.numel():
            ops.append(dist.P2POp(dist.irecv, t, src, group))
    works = dist.batch_isend_irecv(ops) if ops else []

    def wait() -> None:
        for work in works:
            work.wait()
        ops.clear()  # the tensors may be freed from here

    return wait


def connect_all_pairs(
    rank: int,
    world_size: int,
    device: torch.device,
    group: dist.ProcessGroup | None = None,
) -> dict[int, float]:
    """Opens the point-to-point channels between ``rank`` and every other rank now, at
    start-up, and returns each peer's measured one-way bandwidth (bytes/s; CUDA only, from a
    second exchange of the largest message; empty on gloo).

    NCCL creates a pair's communicator, and connects each protocol's channels, on first use,
    which takes tens to hundreds of milliseconds; left lazy, that cost lands on the first
    pipelined step after a drop, as a token gap for every running request. Each pair exchanges
    one message of each size in ``_CONNECT_BYTES`` both ways (gloo: the smallest only), pairs
    in lexicographic order on every rank (the order rules out a wait cycle), then once more as
    one batch (:func:`batch_exchange`, as a restore's weights move). Call on all ranks
    at once, after ``init_process_group``; ``group``: a group of every rank (None: the
    default one).

    Raises ``RuntimeError`` if a peer's message comes back wrong.
    """
    cuda = device.type == "cuda"
    sizes = _CONNECT_BYTES + _CONNECT_BYTES[-1:] if cuda else _CONNECT_BYTES[:1]
    bandwidth = {}
    for low in range(world_size):
        for high in range(low + 1, world_size):
            if rank not in (low, high):
                continue
            peer = high if rank == low else low
            for nbytes in sizes:
                n = nbytes // 8
                mine = torch.full((n,), rank, dtype=torch.int64, device=device)
                theirs = torch.empty(n, dtype=torch.int64, device=device)
                if cuda:
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                if rank == low:
                    dist.send(mine, peer, group=group)
                    dist.recv(theirs, peer, group=group)
                else:
                    dist.recv(theirs, peer, group=group)
                    dist.send(mine, peer, group=group)
                if not bool((theirs == peer).all()):  # also waits for the transfers
                    raise RuntimeError(f"rank {rank}: {nbytes}-byte pair check with {peer} failed")
                if cuda:  # the last size's second exchange: connected, so timed
                    bandwidth[peer] = 2 * nbytes / (time.perf_counter() - start)
            # Batched sends and receives (StageTransport.exchange: a restore's weights) run
            # on the group's own communicator, whose channels to this peer open on first use
            # too: about 0.2 s on the first restore of a process, measured on 2x H200.
            theirs.zero_()
            batch_exchange([(peer, mine)], [(peer, theirs)], group)
            if not bool((theirs == peer).all()):
                raise RuntimeError(f"rank {rank}: batched pair check with {peer} failed")
    return bandwidth
