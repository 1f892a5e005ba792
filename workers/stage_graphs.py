"""CUDA graphs for one pipeline stage's decode micro-batches.

A stage holding half of Llama-3-8B's layers runs a decode micro-batch eagerly in about 6 ms on
an H200, almost all of it kernel launches and Python; its graph replays in about a third of
that. Normal mode captures graphs at start-up for the full model (workers/cuda_graphs.py); a
stage exists only after a drop, and capturing every size then would stall the drop. So a
worker that may drop captures its stages' graphs at start-up, over stage views of its VMM KV
bytes (workers/stage_memory.py, ``capture_stage_graphs``), and the runner keeps them for the
drop (workers/pipeline.py, ``stage_graphs_for``). A stage without them captures the graph of a
batch size the first time a decode micro-batch of that size reaches it (one stall of 15-36 ms
per size on an H200) and replays it after.

What a stage graph reads and writes (fixed addresses, like the full-model graphs):

- The decode metadata in a :class:`~workers.decode_inputs.StaticDecodeInputs` buffer: the
  leader fills it from its scheduler output, as the full-model graphs do; a later stage copies
  the received positions, slots, context lengths and block table into it (device to device)
  and pads rows ``n..size-1`` (position 0, slot -1, context length 0: no KV is touched).
- The first stage reads token ids; a later stage reads ``hidden_in`` and ``residual_in``
  ([max_batch, hidden]) where the received activations are copied.
- It writes ``hidden`` and ``residual`` (a stage that is not last) or the LM head's logits of
  every row (the last stage) into its pool; :meth:`StageGraphs.run` returns views of the first
  ``n`` rows, overwritten by the next replay of the same size.

Prefill and mixed micro-batches of up to the pipeline's token budget (at most 512 tokens) run
through the stage's piecewise graphs (:attr:`StageGraphs.piecewise`, workers/piecewise_graphs.py:
every piece between two attentions captured, attention eager). Steps with pre-drop requests
(remote attention), and larger ones, run eagerly.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Sequence
from typing import Any

import torch

from attention.metadata import AttentionMetadata
from attention.transport import StageInputs
from kernels._triton import num_sms
from kernels.paged_decode import choose_num_splits
from workers.cuda_graphs import DEFAULT_CAPTURE_SIZES, padded_batch_size, record
from workers.decode_inputs import StaticDecodeInputs
from workers.forward_context import ForwardContext, set_forward_context
from workers.models.llama import LlamaModel
from workers.piecewise_graphs import PiecewiseGraphs
from workers.scheduler import ScheduledRequest

logger = logging.getLogger(__name__)


class StageGraphs:
    """Decode graphs of one stage model over its KV view, one per batch size, captured on first
    use or all at once (:meth:`capture_all`).

    ``kv_cache``: the stage's view [num_blocks, layers, 2, block_size, kv_heads, head_dim];
    ``max_blocks_per_seq``: block-table width (the longest context); ``max_batch``: the
    largest micro-batch replayed. ``replay_eagerly`` (tests on CPU) runs what a graph would
    record eagerly over the same static buffers instead of capturing. ``piecewise_tokens``
    (0: none) and ``pool``: the stage's piecewise graphs for prefill and mixed micro-batches
    (:attr:`piecewise`). Not thread-safe: the stage's engine thread only.
    """

    def __init__(
        self,
        model: LlamaModel,
        kv_cache: torch.Tensor,
        max_blocks_per_seq: int,
        max_batch: int,
        replay_eagerly: bool = False,
        piecewise_tokens: int = 0,
        pool: Any = None,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.piecewise = (
            PiecewiseGraphs(model, kv_cache, piecewise_tokens, pool, replay_eagerly)
            if piecewise_tokens > 0
            else None
        )
        """Prefill and mixed micro-batches of up to ``piecewise_tokens`` tokens, everything
        but attention captured (workers/piecewise_graphs.py); None runs them eagerly."""
        self.device = kv_cache.device
        self.sizes = [s for s in DEFAULT_CAPTURE_SIZES if s < max_batch] + [max_batch]
        self.inputs = StaticDecodeInputs(
            max_batch, max_blocks_per_seq, kv_cache.shape[3], self.device
        )
        self.replay_eagerly = replay_eagerly
        hidden_size, dtype = model.cfg.hidden_size, kv_cache.dtype
        self.hidden_in = self.residual_in = None
        if not model.is_first:
            self.hidden_in = torch.zeros(max_batch, hidden_size, dtype=dtype, device=self.device)
            self.residual_in = torch.zeros_like(self.hidden_in)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, tuple[torch.Tensor, ...]] = {}
        self.num_replays = 0
        self._pool = None

    def rebind(self, model: LlamaModel, kv_cache: torch.Tensor) -> None:
        """Points the graphs' eager parts (padding, the attention between pieces) at a new
        stage model and KV view that :func:`~workers.pipeline.stage_graph_key` found equal
        to the captured ones (same weights; same base and strides, maybe more blocks)."""
        self.model, self.kv_cache = model, kv_cache
        if self.piecewise is not None:
            self.piecewise.model, self.piecewise.kv_cache = model, kv_cache

    def size_for(self, query_lens: Sequence[int]) -> int | None:
        """The size a micro-batch replays (None: eager): decode-only and not too large."""
        if not query_lens or any(n != 1 for n in query_lens):
            return None
        return padded_batch_size(len(query_lens), self.sizes)

    # --- inputs ----------------------------------------------------------------------------

    def load_scheduled(self, scheduled: Sequence[ScheduledRequest], size: int) -> None:
        """The first stage: this step's token ids and metadata from the scheduler."""
        self.inputs.load(scheduled, size)

    def sent_inputs(self, size: int, n: int) -> StageInputs:
        """The first stage: what the next stage needs of the ``n`` rows just loaded into
        ``size``'s buffers (positions, metadata, logits rows; activations to be filled in),
        copied out of them, since the sends read them after the next micro-batch's load
        overwrote the buffers. The block table keeps the graphs' full width."""
        f = self.inputs.fields(size)
        meta = AttentionMetadata(
            slot_mapping=f.slot_mapping[:n].clone(),
            block_tables=f.block_tables[:n].clone(),
            seq_lens=f.seq_lens[:n].clone(),
            query_start_loc=self.inputs.query_start_loc[: n + 1],
            max_query_len=1,
            max_seq_len=self.inputs.max_blocks_per_seq * self.inputs.block_size,
        )
        rows = self.inputs.query_start_loc[:n].to(torch.int64)
        return StageInputs(None, None, f.positions[:n].clone(), meta, rows)

    def load_received(self, x: StageInputs, size: int) -> None:
        """A later stage: copies the received activations and metadata of ``n`` rows into
        the static buffers of ``size`` and pads the rest. Raises ValueError when the
        micro-batch does not fit ``size`` or its block table is wider than the graphs'."""
        n, width = x.hidden.shape[0], x.meta.block_tables.shape[1]
        if not 0 < n <= size or width > self.inputs.max_blocks_per_seq:
            raise ValueError(f"{n} rows of table width {width} do not fit graph size {size}")
        f = self.inputs.fields(size)
        self.hidden_in[:n].copy_(x.hidden)
        self.residual_in[:n].copy_(x.residual)
        for dst, src, pad in (
            (f.positions, x.positions, 0),
            (f.slot_mapping, x.meta.slot_mapping, -1),
            (f.seq_lens, x.meta.seq_lens, 0),
        ):
            dst[:n].copy_(src)
            dst[n:].fill_(pad)
        f.block_tables[:n, :width].copy_(x.meta.block_tables)

    # --- replay ----------------------------------------------------------------------------

    def run(self, size: int, n: int) -> tuple[torch.Tensor, ...]:
        """Replays the graph of ``size`` (capturing it first if new) over the loaded inputs;
        returns views of the first ``n`` rows: (hidden, residual), or (logits,) on the last
        stage."""
        if self.replay_eagerly:
            out = self._forward(size)
        else:
            if size not in self.graphs:
                self._capture(size)
            self.graphs[size].replay()
            out = self.outputs[size]
        self.num_replays += 1
        return tuple(t[:n] for t in out)

    def capture_all(self) -> int:
        """Captures the graph of every size not captured yet, and the piecewise graphs of
        every token count; returns how many sizes it captured (decode and piecewise)."""
        todo = [size for size in self.sizes if size not in self.graphs]
        for size in todo:
            self._capture(size)
        pieces = 0 if self.piecewise is None else self.piecewise.capture_all()
        return len(todo) + pieces

    def _forward(self, size: int) -> tuple[torch.Tensor, ...]:
        """What the graph of ``size`` records, over the static buffers."""
        splits = choose_num_splits(
            size,
            self.kv_cache.shape[4],
            self.inputs.max_blocks_per_seq * self.inputs.block_size,
            num_sms(self.device),
        )
        meta = self.inputs.metadata(size, splits)
        f = self.inputs.fields(size)
        if self.model.is_first:
            kwargs = {"input_ids": f.input_ids}
        else:
            kwargs = {"hidden": self.hidden_in[:size], "residual": self.residual_in[:size]}
        with set_forward_context(ForwardContext(meta, self.kv_cache)):
            hidden, residual = self.model(f.positions, **kwargs)
        if self.model.is_last:
            return (self.model.compute_logits(hidden),)
        return hidden, residual

    @torch.inference_mode()
    def _capture(self, size: int) -> None:
        """Warms up (compiles kernels, picks cuBLAS algorithms) over padding and captures the
        graph of ``size`` into the stage's pool. The inputs of the step being run are saved
        around the padding and restored. Capture errors are only this thread's
        (``capture_error_mode='thread_local'``): NCCL's threads keep working."""
        start = time.perf_counter()
        f = self.inputs.fields(size)
        saved = [t.clone() for t in (f.input_ids, f.positions, f.slot_mapping, f.seq_lens)]
        self.inputs.pad(size)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        forward = functools.partial(self._forward, size)
        self.graphs[size], self.outputs[size] = record(forward, self._pool, stream, "thread_local")
        for t, s in zip((f.input_ids, f.positions, f.slot_mapping, f.seq_lens), saved, strict=True):
            t.copy_(s)
        logger.info(
            "stage layers [%d, %d): captured the decode graph of %d in %.1f ms",
            self.model.start,
            self.model.end,
            size,
            1e3 * (time.perf_counter() - start),
        )
