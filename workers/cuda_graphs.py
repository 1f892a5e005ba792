"""CUDA graphs for decode steps: capture the model forward once per batch size, then replay.

A decode step of a small batch launches a few hundred short kernels (about 12 per layer), and
on a GPU their launch and the Python around them cost more than the kernels themselves. A CUDA
graph records those launches once and replays them with one call. This module captures, for a
fixed set of batch sizes, the whole decode step up to the greedy token: embedding, every
layer, the final norm, the LM head over every row and the argmax of each row's logits, as
PyTorch's "whole-network capture" recipe describes
(https://pytorch.org/docs/stable/notes/cuda.html#cuda-graphs) and as vLLM does for decode. A
greedy step is then one host-to-device copy of the packed inputs, one replay and one
device-to-host copy of the token ids; other sampling runs on the captured logits.

What a replay may change and what it may not:

- Every tensor a graph reads lives at a fixed address: :class:`~workers.decode_inputs.
  StaticDecodeInputs` holds one packed buffer sized for the largest captured batch, and each
  size reads its own layout at the buffer's start. A step writes its inputs there (one copy),
  then replays.
- Shapes are fixed: a step of ``n`` requests replays the graph of the next captured size and
  pads rows ``n..size-1`` (token 0 at position 0, slot -1, context length 0). The KV write
  skips slot -1 and the decode kernel writes zeros for a length-0 context without reading any
  block, so padding rows touch no KV block; their outputs are sliced off.
- Block tables have a fixed width, ``ceil(max_model_len / block_size)`` blocks, and the decode
  kernel's context splits are chosen once per size at capture
  (:attr:`AttentionMetadata.decode_num_splits`), so a replay launches the grid it recorded.
  Split bounds are read from each row's context length on the device, so a replay stays exact
  as contexts grow.
- The KV cache tensor and the weights must not move after capture (the runner drops its
  graphs when the cache is reallocated). A transition parks them while the worker runs as a
  pipeline stage; a restore brings them back only when :func:`graph_key` says every tensor
  they read is again where it was at capture (VMM memory: weights and KV come back at the
  same virtual addresses), and captures anew otherwise.

All graphs share one memory pool, captured largest first, so their intermediate activations
reuse the same memory; each graph's outputs (hidden states, logits, greedy ids) stay its own:
``sum(sizes) * vocab`` logits in the model dtype (131 MB for sizes 1..256 and a 128k vocab in
bf16). Only decode-only steps (every scheduled request has one new token) replay; prefill
and mixed steps of up to 512 tokens run through piecewise graphs (workers/piecewise_graphs.py,
attention eager between captured pieces), larger ones eagerly.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from kernels._triton import num_sms
from kernels.paged_decode import choose_num_splits
from workers.decode_inputs import StaticDecodeInputs
from workers.forward_context import ForwardContext, set_forward_context
from workers.models.llama import LlamaModel
from workers.scheduler import ScheduledRequest

if TYPE_CHECKING:
    from workers.piecewise_graphs import PiecewiseGraphs

T = TypeVar("T")

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


@dataclass
class HostGap:
    """Host time from a replayed step's tokens reaching the host to the next replay's launch:
    the GPU idles through it (the scheduler's update and schedule, input preparation). An
    eager step in between voids the interval (:meth:`reset`)."""

    total_s: float = 0.0  # seconds, summed over ``count`` intervals
    count: int = 0
    _since: float | None = None

    def ready(self) -> None:
        """The step's tokens are on the host (call after the device-to-host sync)."""
        self._since = time.perf_counter()

    def launched(self) -> None:
        """A replay was just launched: closes the open interval, if any."""
        if self._since is not None:
            self.total_s += time.perf_counter() - self._since
            self.count += 1
            self._since = None

    def reset(self) -> None:
        self._since = None


@dataclass
class DecodeOutputs:
    """What a decode graph leaves in its output tensors; :meth:`CudaGraphRunner.run` returns
    views of the first ``n`` (real) rows, overwritten by the next replay of the same size."""

    hidden: torch.Tensor  # [rows, hidden_size] final-norm states, model dtype
    logits: torch.Tensor  # [rows, vocab_size] LM head of every row, model dtype
    greedy: torch.Tensor  # [rows] int64: argmax of each row's logits (first maximum on ties)

    def head(self, n: int) -> DecodeOutputs:
        """Views of the first ``n`` rows."""
        return DecodeOutputs(self.hidden[:n], self.logits[:n], self.greedy[:n])


class CudaGraphRunner:
    """Captured decode steps of one model over one KV cache, one graph per batch size.

    Contract: :meth:`capture` once, after the KV cache is allocated and before any replay;
    :meth:`run` only for steps that :meth:`size_for` accepts; one caller thread. The tensors
    :meth:`run` returns are overwritten by the next replay of the same size: consume them
    (sampling, the token copy) before the next step.
    """

    def __init__(
        self,
        model: LlamaModel,
        kv_cache: torch.Tensor,  # [num_blocks, layers_per_block, 2, block_size, kv_heads, d]
        sizes: Sequence[int],
        max_blocks_per_seq: int,
        piecewise: PiecewiseGraphs | None = None,
    ) -> None:
        if not (model.is_first and model.is_last):
            raise ValueError("CUDA graphs capture a model holding every layer")
        self.model = model
        self.kv_cache = kv_cache
        self.sizes = sorted(sizes)
        self.block_size = kv_cache.shape[3]
        self.device = kv_cache.device
        self.inputs = StaticDecodeInputs(
            self.sizes[-1], max_blocks_per_seq, self.block_size, self.device
        )
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, DecodeOutputs] = {}
        self.num_replays = 0
        self.last_size: int | None = None
        """The size :meth:`run` replayed last: its static inputs still hold that step."""
        self.host_gap = HostGap()
        self.piecewise = piecewise
        """The same model's prefill and mixed steps as piecewise graphs, captured with the
        decode graphs, parked and kept with them (workers/piecewise_graphs.py); None: such
        steps run eagerly."""
        pin = self.device.type == "cuda"
        self._greedy_host = torch.zeros(self.max_batch, dtype=torch.int64, pin_memory=pin)
        self._greedy_copied = torch.cuda.Event() if pin else None

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def size_for(self, scheduled: Sequence[ScheduledRequest]) -> int | None:
        """The captured size a step replays, or None when it runs eagerly: a step replays when
        every scheduled request has one new token and a captured size holds the batch."""
        if not scheduled or len(scheduled) > self.max_batch:
            return None
        return replay_size([s.num_new_tokens for s in scheduled], self.sizes)

    def num_splits(self, batch: int) -> int:
        """The decode kernel's context splits for a graph of ``batch`` requests: its automatic
        choice for the full table width (the longest context a replay may see)."""
        context = self.inputs.max_blocks_per_seq * self.block_size
        return choose_num_splits(batch, self.kv_cache.shape[4], context, num_sms(self.device))

    @torch.inference_mode()
    def capture(self) -> None:
        """Warms up and captures every size, largest first, into one shared memory pool, then
        the piecewise graphs if there are some (into theirs).

        The warm-up forward (on the capture stream, over padding inputs) compiles the Triton
        kernels and lets cuBLAS pick its algorithms outside the capture. Raises RuntimeError
        from CUDA if an operation in the step cannot be captured.
        """
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        for batch in reversed(self.sizes):
            self.inputs.pad(batch)
            forward = functools.partial(self.forward_static, batch)
            self.graphs[batch], self.outputs[batch] = record(forward, pool, stream)
        if self.piecewise is not None:
            self.piecewise.capture_all()
        torch.cuda.synchronize(self.device)

    def forward_static(self, batch: int) -> DecodeOutputs:
        """The step a graph of ``batch`` records, run eagerly over size ``batch``'s static
        inputs: the model, the LM head on every row and each row's argmax."""
        meta = self.inputs.metadata(batch, self.num_splits(batch))
        fields = self.inputs.fields(batch)
        with set_forward_context(ForwardContext(meta, self.kv_cache)):
            hidden, _ = self.model(fields.positions, input_ids=fields.input_ids)
        logits = self.model.compute_logits(hidden)
        return DecodeOutputs(hidden, logits, logits.argmax(dim=-1))

    def run(self, scheduled: Sequence[ScheduledRequest], size: int) -> DecodeOutputs:
        """One decode step of ``n`` requests (one new token each) replayed on the graph of
        ``size`` (from :meth:`size_for`): loads the inputs (one copy), replays, and returns
        views of the first ``n`` rows of the graph's outputs. Raises ValueError when the
        step does not fit ``size`` (see :meth:`StaticDecodeInputs.load`)."""
        self.inputs.load(scheduled, size)
        self.graphs[size].replay()
        self.host_gap.launched()
        self.num_replays += 1
        self.last_size = size
        return self.outputs[size].head(len(scheduled))

    def read_greedy(self, greedy: torch.Tensor) -> list[int]:
        """``greedy`` ([n] int64, from :meth:`run`) on the host: one non-blocking copy into a
        pinned buffer and a wait for it, the step's only device-to-host sync."""
        n = greedy.shape[0]
        self._greedy_host[:n].copy_(greedy, non_blocking=True)
        if self._greedy_copied is not None:
            self._greedy_copied.record()
            self._greedy_copied.synchronize()
        return self._greedy_host[:n].tolist()


def record(
    forward: Callable[[], T], pool: Any, stream: torch.cuda.Stream, error_mode: str = "global"
) -> tuple[torch.cuda.CUDAGraph, T]:
    """Runs ``forward`` once on ``stream`` as a warm-up (Triton compiles, cuBLAS picks its
    algorithms, outside the capture), then captures it into a new graph in memory pool
    ``pool``. Returns (graph, what the captured call returned: tensors each replay rewrites).
    ``error_mode``: ``torch.cuda.graph``'s ``capture_error_mode`` (``thread_local`` keeps
    other threads' CUDA calls, NCCL's, legal during the capture). Raises RuntimeError from
    CUDA when an operation cannot be captured.

    Python's cyclic garbage collector is paused for the capture (:func:`gc_paused`)."""
    device = stream.device
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        forward()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with (
        gc_paused(),
        torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode=error_mode),
    ):
        out = forward()
    return graph, out


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for the block (restored after it, also on error).

    A collection inside a capture may free a dead CUDA graph held in a reference cycle (an
    engine torn down without ``close``, say). Its destructor (``CUDAGraph::reset``) is not
    permitted while a stream captures, and it invalidates the capture: CUDA then fails the
    next launch with "operation failed due to a previous error during capture". On 2x H200
    a GPU test run failed so at its second engine's capture (dead graphs' resets logged in
    it), and every later test of the process with it. A stage's graphs are captured while
    the group serves, where the same would fail a serving step."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def graph_key(model: torch.nn.Module, kv_cache: torch.Tensor) -> tuple:
    """What captured decode graphs depend on: name, address, shape, stride and dtype of every
    parameter and buffer of ``model``, and of ``kv_cache``. Graphs captured under one key
    replay correctly under an equal key (the tensors they read are at the same addresses with
    the same layout and meaning), which is how a restore on VMM memory keeps them."""

    def fields(t: torch.Tensor) -> tuple:
        return (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)

    named = (*model.named_parameters(), *model.named_buffers())
    return (tuple((name, *fields(t)) for name, t in named), fields(kv_cache))
