"""Decode-step inputs for CUDA graph replays: built incrementally on the host, one copy a step.

A decode step of ``n`` requests (one new token each) needs, per request, its token id, its
position, its KV slot, its context length and its block-table row. Rebuilding those from
Python lists every step costs more host time than a small batch's whole forward on a GPU,
so this module keeps them across steps:

- :class:`BlockTableRows` holds one host block-table row per live request, at a stable row,
  and rewrites only what changed since the row was last written: usually nothing, one new
  block id when a request crosses a block boundary, the whole row after a preemption, an
  abort or a transition gave it new blocks. Change detection compares the request's
  ``block_ids`` with the copy written (a C-level list compare), so it needs no hook in the
  code that allocates, frees or rewrites blocks.
- :class:`StaticDecodeInputs` packs one step into a pinned host buffer with numpy (token
  ids, positions, slot mapping, context lengths, block tables) and sends it with one
  non-blocking host-to-device copy into a device buffer whose fixed addresses the captured
  graphs read.

Packed layout of a graph of ``B`` requests and table width ``W`` (bytes from the buffer's
start; every field starts on an 8-byte boundary, so typed views of the bytes are valid):

======================  ===============  ====================================
field                   dtype, shape     offset
======================  ===============  ====================================
``input_ids``           int64 [B]        0
``positions``           int64 [B]        8 B
``slot_mapping``        int64 [B]        16 B
``seq_lens``            int32 [B]        24 B
``block_tables``        int32 [B, W]     24 B + 4 B rounded up to 8
======================  ===============  ====================================

Each graph size has its own layout at the start of the same buffer; a step copies only its
size's bytes. Rows ``n..B-1`` are padding (token 0, position 0, slot -1, context length 0):
the KV write skips slot -1 and the decode kernel reads no block for a length-0 context.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from attention.metadata import AttentionMetadata
from workers.request import Request
from workers.scheduler import ScheduledRequest


@dataclass(frozen=True)
class PackedLayout:
    """Byte offsets of one graph size's fields in the packed buffer (module docstring)."""

    batch: int  # B: rows (requests, padding included)
    width: int  # W: block-table columns (blocks per sequence)

    @property
    def seq_lens_offset(self) -> int:
        return 24 * self.batch

    @property
    def table_offset(self) -> int:
        return -(-(28 * self.batch) // 8) * 8

    @property
    def nbytes(self) -> int:
        return self.table_offset + 4 * self.batch * self.width


@dataclass
class DecodeFields:
    """Typed views of one layout's fields: numpy arrays over the host buffer, or tensors over
    the device buffer (shapes and dtypes in the module docstring)."""

    input_ids: np.ndarray | torch.Tensor
    positions: np.ndarray | torch.Tensor
    slot_mapping: np.ndarray | torch.Tensor
    seq_lens: np.ndarray | torch.Tensor
    block_tables: np.ndarray | torch.Tensor


def _fields(buf: np.ndarray | torch.Tensor, layout: PackedLayout) -> DecodeFields:
    """Views of ``buf`` (uint8, host numpy or device torch) at ``layout``'s offsets."""
    b, s, t = layout.batch, layout.seq_lens_offset, layout.table_offset
    i64, i32 = (np.int64, np.int32) if isinstance(buf, np.ndarray) else (torch.int64, torch.int32)
    return DecodeFields(
        input_ids=buf[0 : 8 * b].view(i64),
        positions=buf[8 * b : 16 * b].view(i64),
        slot_mapping=buf[16 * b : s].view(i64),
        seq_lens=buf[s : s + 4 * b].view(i32),
        block_tables=buf[t : layout.nbytes].view(i32).reshape(b, layout.width),
    )


class BlockTableRows:
    """Host block tables kept across steps: one row of ``width`` int32 block ids per request.

    Invariant: ``table[row, :len(written[row])] == written[row]``, where ``written[row]`` is
    the list of block ids last written to the row; columns past it hold stale ids. A request
    keeps its row while it stays in the steps that use this class; rows of requests missing
    from a step are reclaimed only when a new request finds no free row. Not thread-safe.
    """

    def __init__(self, num_rows: int, width: int) -> None:
        if num_rows < 1 or width < 1:
            raise ValueError(f"need num_rows >= 1 and width >= 1, got {num_rows}, {width}")
        self.width = width
        self.table = np.zeros((num_rows, width), dtype=np.int32)
        self.lengths = np.zeros(num_rows, dtype=np.int64)
        """[num_rows]: valid block ids in each row (``len(written[row])``)."""
        self._written: list[list[int]] = [[] for _ in range(num_rows)]
        self._row_of: dict[str, int] = {}
        self._free = list(range(num_rows - 1, -1, -1))
        self.num_writes = 0
        """Rows written or extended since construction (tests check that steps reuse rows)."""

    def rows_for(self, requests: Sequence[Request]) -> list[int]:
        """Each request's row, brought up to date with its ``block_ids``. Raises ValueError
        when a request holds more than ``width`` blocks or ``requests`` exceed the rows."""
        rows = []
        row_of, written = self._row_of, self._written
        for r in requests:
            row = row_of.get(r.request_id)
            if row is None:
                row = self._assign(r.request_id, requests)
            if written[row] != r.block_ids:
                self._write(row, r.block_ids)
            rows.append(row)
        return rows

    def _assign(self, request_id: str, step: Sequence[Request]) -> int:
        if not self._free:
            live = {r.request_id for r in step}
            for rid in [rid for rid in self._row_of if rid not in live]:
                self._free.append(self._row_of.pop(rid))
        if not self._free:
            raise ValueError(f"a step of {len(step)} requests exceeds {len(self.lengths)} rows")
        row = self._free.pop()
        self._row_of[request_id] = row
        self._written[row] = []
        self.lengths[row] = 0
        return row

    def _write(self, row: int, blocks: list[int]) -> None:
        n = len(blocks)
        if n > self.width:
            raise ValueError(f"{n} blocks exceed the block-table width {self.width}")
        old = self._written[row]
        k = len(old)
        if n > k and blocks[:k] == old:  # grown: write only the new tail
            self.table[row, k:n] = blocks[k:]
            old.extend(blocks[k:])
        else:
            self.table[row, :n] = blocks
            self._written[row] = list(blocks)
        self.lengths[row] = n
        self.num_writes += 1


@dataclass
class _SizeViews:
    """One graph size's views of the packed buffers."""

    host: DecodeFields  # numpy views of the pinned host buffer
    device: DecodeFields  # tensor views of the device buffer (what the graph reads)
    host_bytes: torch.Tensor  # [nbytes] uint8: the host bytes a step of this size copies
    device_bytes: torch.Tensor  # [nbytes] uint8: their destination


class StaticDecodeInputs:
    """The fixed-address device buffer every captured graph reads, its pinned host twin, and
    the incremental host state that fills it.

    Sizes' layouts overlap in the one buffer: a graph may only be warmed up or replayed
    right after :meth:`pad` or :meth:`load` wrote its own size.

    ``max_batch``: the largest graph size; ``max_blocks_per_seq``: the table width ``W``;
    ``block_size``: tokens per KV block. ``query_start_loc`` [max_batch + 1] int32 is the
    constant 0, 1, 2, ... (one query token per request).
    """

    def __init__(
        self, max_batch: int, max_blocks_per_seq: int, block_size: int, device: torch.device
    ) -> None:
        self.max_batch = max_batch
        self.max_blocks_per_seq = max_blocks_per_seq
        self.block_size = block_size
        self.device = device
        nbytes = PackedLayout(max_batch, max_blocks_per_seq).nbytes
        pin = device.type == "cuda"
        self._host = torch.zeros(nbytes, dtype=torch.uint8, pin_memory=pin)
        self._host_np = self._host.numpy()
        self._device = torch.zeros(nbytes, dtype=torch.uint8, device=device)
        self._sizes: dict[int, _SizeViews] = {}
        self._copied = torch.cuda.Event() if pin else None
        self.rows = BlockTableRows(2 * max_batch, max_blocks_per_seq)
        self.query_start_loc = torch.arange(max_batch + 1, dtype=torch.int32, device=device)

    def _size(self, batch: int) -> _SizeViews:
        views = self._sizes.get(batch)
        if views is None:
            if not 0 < batch <= self.max_batch:
                raise ValueError(f"batch {batch} is outside 1..{self.max_batch}")
            layout = PackedLayout(batch, self.max_blocks_per_seq)
            views = _SizeViews(
                _fields(self._host_np, layout),
                _fields(self._device, layout),
                self._host[: layout.nbytes],
                self._device[: layout.nbytes],
            )
            self._sizes[batch] = views
        return views

    def fields(self, batch: int) -> DecodeFields:
        """Device tensors a graph of ``batch`` rows reads (fixed addresses)."""
        return self._size(batch).device

    def host(self, batch: int) -> DecodeFields:
        """Host numpy views a step of ``batch`` padded rows writes before its copy."""
        return self._size(batch).host

    def pad(self, batch: int) -> None:
        """Sets every row of size ``batch``'s device fields to padding (token 0, position 0,
        slot -1, context length 0), so a warm-up forward over them writes no KV block."""
        f = self.fields(batch)
        for t, value in ((f.input_ids, 0), (f.positions, 0), (f.slot_mapping, -1), (f.seq_lens, 0)):
            t.fill_(value)

    def load(self, scheduled: Sequence[ScheduledRequest], padded: int) -> None:
        """Writes a decode step of ``n`` requests (one new token each) into rows ``0..n-1`` of
        size ``padded``'s layout, pads rows ``n..padded-1``, and copies the layout's bytes to
        the device (asynchronous on CUDA). Only ``block_tables[:n, :w]`` is written (``w``
        covers the longest context): other columns keep stale ids that the decode kernel
        never reads. Raises ValueError when the batch is empty or exceeds ``padded`` or
        ``max_batch``, a request holds more blocks than the table is wide, or a request
        lacks the block of its new token."""
        n = len(scheduled)
        if not 0 < n <= padded <= self.max_batch:
            raise ValueError(f"need 0 < {n} requests <= padded {padded} <= {self.max_batch}")
        requests = [s.request for s in scheduled]
        computed = [s.start for s in scheduled]
        token_ids = [r.token_id(c) for r, c in zip(requests, computed, strict=True)]
        rows = np.array(self.rows.rows_for(requests), dtype=np.int64)
        positions = np.array(computed, dtype=np.int64)
        block_index = positions // self.block_size
        if (self.rows.lengths[rows] <= block_index).any():  # rows hold <= max_blocks_per_seq
            raise ValueError("a request has no KV block for its new token")
        views = self._size(padded)
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copy has read the host buffer
        self._write(views.host, n, token_ids, positions, rows, block_index)
        views.device_bytes.copy_(views.host_bytes, non_blocking=True)
        if self._copied is not None:
            self._copied.record()

    def _write(
        self,
        h: DecodeFields,  # host views of the step's padded size
        n: int,
        token_ids: list[int],  # [n]
        positions: np.ndarray,  # [n] int64
        rows: np.ndarray,  # [n] int64: each request's row in ``self.rows.table``
        block_index: np.ndarray,  # [n] int64: positions // block_size
    ) -> None:
        table, bs = self.rows.table, self.block_size
        h.input_ids[:n], h.input_ids[n:] = token_ids, 0
        h.positions[:n], h.positions[n:] = positions, 0
        h.seq_lens[:n], h.seq_lens[n:] = positions + 1, 0
        slots = table[rows, block_index].astype(np.int64) * bs + positions % bs
        h.slot_mapping[:n], h.slot_mapping[n:] = slots, -1
        width = int(block_index.max()) + 1
        h.block_tables[:n, :width] = table[rows, :width]

    def metadata(self, batch: int, num_splits: int) -> AttentionMetadata:
        """Attention metadata over size ``batch``'s device fields."""
        f = self.fields(batch)
        return AttentionMetadata(
            slot_mapping=f.slot_mapping,
            block_tables=f.block_tables,
            seq_lens=f.seq_lens,
            query_start_loc=self.query_start_loc[: batch + 1],
            max_query_len=1,
            max_seq_len=self.max_blocks_per_seq * self.block_size,
            decode_num_splits=num_splits,
        )
