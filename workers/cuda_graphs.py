"""CUDA graphs for decode steps: capture the model forward once per batch size, then replay.

A decode step of a small batch launches a few hundred short kernels (about 12 per layer), and
on a GPU their launch and the Python around them cost more than the kernels themselves. A CUDA
graph records those launches once and replays them with one call. This module captures the
model forward (embedding through the final norm; the LM head and the sampler stay eager) for
a fixed set of batch sizes, as PyTorch's "whole-network capture" recipe describes
(https://pytorch.org/docs/stable/notes/cuda.html#cuda-graphs) and as vLLM does for decode.

What a replay may change and what it may not:

- Every tensor a graph reads lives at a fixed address: :class:`StaticDecodeInputs` holds one
  buffer per model input, sized for the largest captured batch, and each graph reads the
  first ``batch`` rows. A step copies its inputs there, then replays.
- Shapes are fixed: a step of ``n`` requests replays the graph of the next captured size and
  pads rows ``n..size-1`` (token 0 at position 0, slot -1, context length 0). The KV write
  skips slot -1 and the decode kernel writes zeros for a length-0 context without reading any
  block, so padding rows touch no KV block; their outputs are sliced off.
- Block tables have a fixed width, ``ceil(max_model_len / block_size)`` blocks, and the decode
  kernel's context splits are chosen once per size at capture
  (:attr:`AttentionMetadata.decode_num_splits`), so a replay launches the grid it recorded.
  Split bounds are read from each row's context length on the device, so a replay stays exact
  as contexts grow.
- The KV cache tensor must not be reallocated after capture (the runner drops its graphs if
  it is).

All graphs share one memory pool, captured largest first, so their intermediate activations
reuse the same memory; each graph's output tensor stays its own. Only decode-only steps (every
scheduled request has one new token) replay; prefill and mixed steps run eagerly.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from attention.metadata import AttentionMetadata
from kernels._triton import num_sms
from kernels.paged_decode import choose_num_splits
from workers.forward_context import ForwardContext, set_forward_context
from workers.models.llama import LlamaModel

logger = logging.getLogger(__name__)

DEFAULT_CAPTURE_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
"""Decode batch sizes (requests) captured by default, capped by the scheduler's limits."""


def capture_sizes(
    max_num_seqs: int, max_num_batched_tokens: int, largest: int = DEFAULT_CAPTURE_SIZES[-1]
) -> list[int]:
    """Batch sizes to capture: the defaults up to the largest decode batch the scheduler can
    form (``min(max_num_seqs, max_num_batched_tokens, largest)``), plus that bound itself, so
    a full batch replays without padding. Raises ValueError on a bound below 1."""
    cap = min(max_num_seqs, max_num_batched_tokens, largest)
    if cap < 1:
        raise ValueError(f"capture bound must be >= 1, got {cap}")
    sizes = [s for s in DEFAULT_CAPTURE_SIZES if s < cap]
    return [*sizes, cap]


def padded_batch_size(num_seqs: int, sizes: Sequence[int]) -> int | None:
    """The smallest captured size (sorted ascending) holding ``num_seqs`` requests, or None
    when the batch is larger than every captured graph. Raises ValueError if num_seqs < 1."""
    if num_seqs < 1:
        raise ValueError(f"num_seqs must be >= 1, got {num_seqs}")
    return next((s for s in sizes if s >= num_seqs), None)


def replay_size(query_lens: Sequence[int], sizes: Sequence[int]) -> int | None:
    """The graph size a step replays, or None when it must run eagerly: a step replays only
    when every scheduled request has exactly one new token (decode-only) and a captured size
    holds the batch. ``query_lens``: new tokens per scheduled request."""
    if not query_lens or any(n != 1 for n in query_lens):
        return None
    return padded_batch_size(len(query_lens), sizes)


def graph_blocker(
    device: torch.device, enforce_eager: bool, backend_name: str, full_model: bool
) -> str | None:
    """Why a runner must stay eager, or None when its decode steps can be captured.

    Graphs need CUDA, the Triton backend (the torch reference syncs the host inside attention)
    and a model holding every layer (a pipeline stage takes hidden states, not token ids).
    """
    if enforce_eager:
        return "enforce_eager is set"
    if device.type != "cuda":
        return f"device is {device.type}, not cuda"
    if backend_name != "triton":
        return f"attention backend {backend_name!r} syncs the host; graphs need 'triton'"
    if not full_model:
        return "the model is a pipeline stage, not every layer"
    return None


class StaticDecodeInputs:
    """The fixed-address device buffers every captured graph reads, sized for the largest one.

    Buffers: ``input_ids``, ``positions``, ``slot_mapping`` [max_batch] int64; ``seq_lens``
    [max_batch] int32; ``block_tables`` [max_batch, max_blocks_per_seq] int32;
    ``query_start_loc`` [max_batch + 1] int32 (0, 1, 2, ...: one query token per request,
    constant). They start as padding (slot -1, context length 0), so a warm-up or capture
    forward over them writes no KV block.
    """

    def __init__(self, max_batch: int, max_blocks_per_seq: int, device: torch.device) -> None:
        def zeros(*shape: int, dtype: torch.dtype = torch.int64) -> torch.Tensor:
            return torch.zeros(shape, dtype=dtype, device=device)

        self.max_batch = max_batch
        self.max_blocks_per_seq = max_blocks_per_seq
        self.device = device
        self.input_ids = zeros(max_batch)
        self.positions = zeros(max_batch)
        self.slot_mapping = torch.full((max_batch,), -1, dtype=torch.int64, device=device)
        self.seq_lens = zeros(max_batch, dtype=torch.int32)
        self.block_tables = zeros(max_batch, max_blocks_per_seq, dtype=torch.int32)
        self.query_start_loc = torch.arange(max_batch + 1, dtype=torch.int32, device=device)

    def fill(
        self,
        input_ids: list[int],
        positions: list[int],
        slot_mapping: list[int],
        seq_lens: list[int],
        block_tables: list[list[int]],
        padded: int,
    ) -> None:
        """Copies one decode step of ``n`` requests into rows ``0..n-1`` and pads rows
        ``n..padded-1`` (token 0, position 0, slot -1, context length 0).

        Only ``block_tables[:n, :width]`` is written (``width`` = the longest table): columns
        past a row's blocks and the padding rows' tables keep stale block ids, which the
        decode kernel never reads (it reads ``ceil(seq_len / block_size)`` blocks per row).
        Copies are asynchronous on CUDA (pinned host memory). Raises ValueError when the
        batch is empty, exceeds ``padded`` or ``max_batch``, or a table is too wide.
        """
        n = len(input_ids)
        if not 0 < n <= padded <= self.max_batch:
            raise ValueError(f"need 0 < {n} requests <= padded {padded} <= {self.max_batch}")
        width = max(len(t) for t in block_tables)
        if width > self.max_blocks_per_seq:
            raise ValueError(f"block table of {width} blocks > {self.max_blocks_per_seq}")
        pad = padded - n
        self._copy(self.input_ids[:padded], input_ids + [0] * pad)
        self._copy(self.positions[:padded], positions + [0] * pad)
        self._copy(self.slot_mapping[:padded], slot_mapping + [-1] * pad)
        self._copy(self.seq_lens[:padded], seq_lens + [0] * pad)
        table = [t + [0] * (width - len(t)) for t in block_tables]
        self._copy(self.block_tables[:n, :width], table)

    def _copy(self, dst: torch.Tensor, values: list) -> None:
        src = torch.tensor(values, dtype=dst.dtype)
        if self.device.type == "cuda":
            src = src.pin_memory()
        dst.copy_(src, non_blocking=True)

    def metadata(self, batch: int, num_splits: int, block_size: int) -> AttentionMetadata:
        """Attention metadata over the first ``batch`` rows (views of the buffers)."""
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:batch],
            block_tables=self.block_tables[:batch],
            seq_lens=self.seq_lens[:batch],
            query_start_loc=self.query_start_loc[: batch + 1],
            max_query_len=1,
            max_seq_len=self.max_blocks_per_seq * block_size,
            decode_num_splits=num_splits,
        )


class CudaGraphRunner:
    """Captured decode forwards of one model over one KV cache, one graph per batch size.

    Contract: :meth:`capture` once, after the KV cache is allocated and before any replay;
    :meth:`run` only for steps that :meth:`fits` accepts (decode-only, a captured size); one
    caller thread. The tensor :meth:`run` returns is overwritten by the next replay of the
    same size: consume it (LM head, sampling) before the next step.
    """

    def __init__(
        self,
        model: LlamaModel,
        kv_cache: torch.Tensor,  # [num_blocks, layers_per_block, 2, block_size, kv_heads, d]
        sizes: Sequence[int],
        max_blocks_per_seq: int,
    ) -> None:
        if not (model.is_first and model.is_last):
            raise ValueError("CUDA graphs capture a model holding every layer")
        self.model = model
        self.kv_cache = kv_cache
        self.sizes = sorted(sizes)
        self.block_size = kv_cache.shape[3]
        self.device = kv_cache.device
        self.inputs = StaticDecodeInputs(self.sizes[-1], max_blocks_per_seq, self.device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}  # [size, hidden] final-norm output
        self.num_replays = 0

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def fits(self, query_lens: Sequence[int], block_tables: Sequence[Sequence[int]]) -> bool:
        """True when a step with these new-token counts and block tables can replay: decode-only,
        a captured size holds it, and no table is wider than the static one."""
        if replay_size(query_lens, self.sizes) is None:
            return False
        return max(len(t) for t in block_tables) <= self.inputs.max_blocks_per_seq

    def num_splits(self, batch: int) -> int:
        """The decode kernel's context splits for a graph of ``batch`` requests: its automatic
        choice for the full table width (the longest context a replay may see)."""
        context = self.inputs.max_blocks_per_seq * self.block_size
        return choose_num_splits(batch, self.kv_cache.shape[4], context, num_sms(self.device))

    @torch.inference_mode()
    def capture(self) -> None:
        """Warms up and captures every size, largest first, into one shared memory pool.

        The warm-up forward (on the capture stream) compiles the Triton kernels and lets
        cuBLAS pick its algorithms outside the capture. Raises RuntimeError from CUDA if an
        operation in the forward cannot be captured.
        """
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        for batch in reversed(self.sizes):
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                self.forward_static(batch)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                self.outputs[batch] = self.forward_static(batch)
            self.graphs[batch] = graph
        torch.cuda.synchronize(self.device)

    def forward_static(self, batch: int) -> torch.Tensor:
        """The forward a graph of ``batch`` records, run eagerly: the model over the first
        ``batch`` rows of the static inputs; returns [batch, hidden] final-norm states."""
        meta = self.inputs.metadata(batch, self.num_splits(batch), self.block_size)
        with set_forward_context(ForwardContext(meta, self.kv_cache)):
            hidden, _ = self.model(
                self.inputs.positions[:batch], input_ids=self.inputs.input_ids[:batch]
            )
        return hidden

    def run(
        self,
        input_ids: list[int],
        positions: list[int],
        slot_mapping: list[int],
        seq_lens: list[int],
        block_tables: list[list[int]],
    ) -> torch.Tensor:
        """One decode step of ``n`` requests (one token each): fills the static inputs, replays
        the next captured size and returns its [n, hidden] final-norm states (a view of the
        graph's output). Raises ValueError when no captured size holds ``n``."""
        n = len(input_ids)
        size = padded_batch_size(n, self.sizes)
        if size is None:
            raise ValueError(f"batch of {n} exceeds the largest captured size {self.max_batch}")
        self.inputs.fill(input_ids, positions, slot_mapping, seq_lens, block_tables, size)
        self.graphs[size].replay()
        self.num_replays += 1
        return self.outputs[size][:n]
