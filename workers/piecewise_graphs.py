"""Piecewise CUDA graphs: prefill and mixed steps with everything but attention captured.

A decode-only step replays one whole-model graph (workers/cuda_graphs.py), but a step that
carries a prefill chunk cannot: its attention grid depends on each sequence's query length. Run
eagerly, a step costs about 375 us of host time a layer on an H200 (kernel launches and the
Python around them, as the engine bench's eager decode shows): 6 ms for half of Llama-3-8B,
more than the GPU needs for a few hundred tokens. Under a burst nearly every pipeline
micro-batch mixes a prefill chunk with decodes. vLLM V1 answers this with *piecewise* CUDA graphs
(vLLM V1 design notes, "torch.compile and CUDA graphs": the model is split at the attention
op, each piece between two attentions is captured per token count, attention runs eagerly);
this module does the same for our Llama layers, without torch.compile:

- piece 0: the embedding (first stage) or the received activations, then layer 0's input norm,
  q/k/v projection, RoPE and KV write (slot -1 writes nothing);
- eager: layer 0's paged attention over the step's real tokens and metadata;
- piece i (1 <= i < layers): layer i-1's ``o_proj``, post-attention norm and MLP, then layer
  i's input norm, q/k/v, RoPE and KV write;
- eager: layer i's attention; ...
- piece L: the last layer's ``o_proj`` and MLP, and the final norm on the last stage.

A step of ``n`` tokens runs the pieces captured for the next size ``N >= n`` (padding rows
``n..N-1``: position 0, slot -1, so no KV is touched; the rows are independent in every piece,
and their outputs are sliced off). Attention reads only rows ``< n``. So a layer costs one graph
replay, one attention launch (two in a mixed step: attention/triton_backend.py) and one copy.
On an H200, a 64-token mixed step of Llama-3-8B (a chunk beside 32 decodes) takes 8.4 ms
through the pieces and 19.6 ms eagerly (docs/benchmarks.md, session 7).

Static buffers (fixed addresses, sized for the largest size): the inputs (token ids, or hidden
and residual from the previous stage), positions and slots; ``q`` (rotated queries, written by a
piece, read by attention), ``attn`` (attention output, read by the next piece), the residual
stream between pieces, and the outputs. Pieces keep nothing of their own alive between
replays, so every piece of every size (and every stage of a worker) can share one memory pool.
What a graph reads must not move: the parameters and the KV tensor (the same contract, and the
same key, as the decode graphs: workers/cuda_graphs.py ``graph_key``).

A whole model's steps replay up to 512 tokens (:data:`MODEL_PIECEWISE_TOKENS`, vLLM's default
bound too); larger ones run eagerly, where the GPU, not the host, sets the step time (an eager
1,024-token mixed step of Llama-3-8B on an H200: 15 ms of host time to launch, 29 ms on the
GPU). A pipeline stage's pieces replay up to its micro-batch budget (1,024 tokens by default,
workers/config.py ``PIPELINE_TOKENS``): a stage runs half the layers, so its GPU time halves,
while the host time per micro-batch of the leader, which also schedules and samples every micro-
batch, does not. On the Azure code burst (2 H200s, docs/benchmarks.md, session 16) an eager
1,024-token micro-batch took 8-19 ms of the leader's host time on stage 0 and the group ran
host-bound; through the pieces it took 3 ms, for about 720 MiB more graph memory per GPU. Steps
with pre-drop requests (remote attention) run eagerly as well: their attention is a message
exchange.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Sequence
from typing import Any

import torch

from attention.metadata import AttentionMetadata
from workers.cuda_graphs import record
from workers.models.llama import LlamaModel

logger = logging.getLogger(__name__)

PIECEWISE_SIZES = (16, 32, 64, 96, 128, 192, 256, 320, 384, 448, 512, 640, 768, 896, 1024)
"""Token counts that may be captured (padding waste at most a third above 64 tokens); each
user caps them (:func:`piecewise_sizes`)."""

MODEL_PIECEWISE_TOKENS = 512
"""The largest step a whole model's pieces replay (module docstring)."""


def piecewise_max_tokens(scheduler: Any, stage: bool) -> int:
    """The largest step whose pieces are captured: for a whole model the step budget
    (``scheduler.max_num_batched_tokens``) up to :data:`MODEL_PIECEWISE_TOKENS`, for a
    pipeline stage (``stage``) the micro-batch budget (``scheduler.pipeline_token_budget``,
    a workers.config.SchedulerConfig) up to the largest of :data:`PIECEWISE_SIZES`."""
    if stage:
        return min(scheduler.pipeline_token_budget, PIECEWISE_SIZES[-1])
    return min(scheduler.max_num_batched_tokens, MODEL_PIECEWISE_TOKENS)


def piecewise_sizes(max_tokens: int, sizes: Sequence[int] = PIECEWISE_SIZES) -> list[int]:
    """The sizes to capture for steps of at most ``max_tokens`` tokens: ``sizes`` below it, then
    ``max_tokens`` itself when it is below the largest of ``sizes`` (a full step replays with no
    padding). Raises ValueError when ``max_tokens`` < 1."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    top = min(max_tokens, max(sizes))
    return [*(s for s in sorted(sizes) if s < top), top]


class PiecewiseGraphs:
    """The pieces of ``model`` (a whole model or a pipeline stage) over ``kv_cache``, captured
    per token count on first use or all at once (:meth:`capture_all`).

    ``kv_cache``: [num_blocks, layers, 2, block_size, kv_heads, head_dim], the tensor the
    model's layers index (its block count may grow behind the same base). ``max_tokens``: the
    largest step that replays (see :func:`piecewise_sizes`). ``pool``: a CUDA graph memory
    pool to share (None: a new one). ``replay_eagerly`` runs what the pieces record eagerly over
    the same static buffers (CPU tests). Not thread-safe: the engine thread only.
    """

    def __init__(
        self,
        model: LlamaModel,
        kv_cache: torch.Tensor,
        max_tokens: int,
        pool: Any = None,
        replay_eagerly: bool = False,
    ) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.sizes = piecewise_sizes(max_tokens)
        self.replay_eagerly = replay_eagerly
        self.pool = pool
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}
        self.num_runs = 0
        cfg, device, dtype = model.cfg, kv_cache.device, kv_cache.dtype
        rows = self.sizes[-1]

        def zeros(*shape: int, dt: torch.dtype = dtype) -> torch.Tensor:
            return torch.zeros(*shape, dtype=dt, device=device)

        self.input_ids = zeros(rows, dt=torch.int64) if model.is_first else None
        self.hidden_in = None if model.is_first else zeros(rows, cfg.hidden_size)
        self.residual_in = None if model.is_first else zeros(rows, cfg.hidden_size)
        self.positions = zeros(rows, dt=torch.int64)
        self.slot_mapping = torch.full((rows,), -1, dtype=torch.int64, device=device)
        self.q = zeros(rows, cfg.q_size)
        self.attn = zeros(rows, cfg.q_size)
        self.residual = zeros(rows, cfg.hidden_size)
        self.hidden_out = zeros(rows, cfg.hidden_size)
        self.residual_out = zeros(rows, cfg.hidden_size)

    @property
    def max_tokens(self) -> int:
        return self.sizes[-1]

    def size_for(self, num_tokens: int) -> int | None:
        """The captured size a step of ``num_tokens`` runs at, or None (eager) when it is
        larger than every size or empty."""
        if num_tokens < 1:
            return None
        return next((s for s in self.sizes if s >= num_tokens), None)

    # --- one step --------------------------------------------------------------------------

    @torch.inference_mode()
    def run(
        self,
        meta: AttentionMetadata,
        positions: torch.Tensor,  # [n] int64
        input_ids: torch.Tensor | None = None,  # [n] int64, first stage
        hidden: torch.Tensor | None = None,  # [n, hidden], later stages
        residual: torch.Tensor | None = None,  # [n, hidden], later stages
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One step of ``n`` tokens: loads its inputs into the static buffers, replays the
        pieces of its size (capturing them first if new) with each layer's attention launched
        eagerly in between, and returns views of the first ``n`` rows of (hidden, residual),
        as :meth:`LlamaModel.forward` returns them; the next run overwrites them. Raises
        ValueError when ``n`` fits no size or the inputs do not match the stage."""
        n = positions.shape[0]
        size = self.size_for(n)
        if size is None:
            raise ValueError(
                f"a step of {n} tokens fits no captured size (up to {self.max_tokens})"
            )
        self._load(n, size, meta.slot_mapping, positions, input_ids, hidden, residual)
        if self.replay_eagerly:
            pieces = [functools.partial(self._piece, size, i) for i in range(self.num_pieces)]
        else:
            if size not in self.graphs:
                self._capture(size)
            pieces = [g.replay for g in self.graphs[size]]
        for i, layer in enumerate(self.model.layers):  # piece i, then layer i's attention
            pieces[i]()
            self.attn[:n].copy_(layer.self_attn.attend(self._q_heads(n), self.kv_cache, meta))
        pieces[-1]()  # the last layer's MLP (and the final norm)
        self.num_runs += 1
        return self.hidden_out[:n], self.residual_out[:n]

    def _load(
        self,
        n: int,
        size: int,
        slot_mapping: torch.Tensor,
        positions: torch.Tensor,
        input_ids: torch.Tensor | None,
        hidden: torch.Tensor | None,
        residual: torch.Tensor | None,
    ) -> None:
        if self.model.is_first:
            if input_ids is None or input_ids.shape[0] != n:
                raise ValueError(f"the first stage needs input_ids of {n} tokens")
            self.input_ids[:n].copy_(input_ids)
        else:
            if hidden is None or residual is None or hidden.shape[0] != n:
                raise ValueError(f"a later stage needs hidden and residual of {n} tokens")
            self.hidden_in[:n].copy_(hidden)
            self.residual_in[:n].copy_(residual)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(slot_mapping)
        self.slot_mapping[n:size].fill_(-1)  # padding rows write no KV

    def _q_heads(self, n: int) -> torch.Tensor:
        cfg = self.model.cfg
        return self.q[:n].view(n, cfg.num_heads, cfg.head_dim)

    # --- the pieces ------------------------------------------------------------------------

    @property
    def num_pieces(self) -> int:
        return len(self.model.layers) + 1

    def _piece(self, size: int, i: int) -> None:
        """What piece ``i`` of ``size`` records (see the module docstring), over the static
        buffers' first ``size`` rows."""
        model, layers = self.model, self.model.layers
        rows = slice(0, size)
        if i == 0:
            if model.is_first:
                hidden, residual = model.embed_tokens(self.input_ids[rows]), None
            else:
                hidden, residual = self.hidden_in[rows], self.residual_in[rows]
        else:
            layer = layers[i - 1]
            hidden = layer.self_attn.project(self.attn[rows])
            hidden, residual = layer.mlp_block(hidden, self.residual[rows])
        if i < len(layers):
            layer = layers[i]
            qkv, residual = layer.input_layernorm.forward_linear(
                hidden, residual, layer.self_attn.qkv_proj
            )
            q = layer.self_attn.rope_and_write_kv(
                qkv,
                self.positions[rows],
                model.cos_sin_cache,
                self.kv_cache,
                self.slot_mapping[rows],
            )
            self.q[rows].copy_(q.reshape(size, -1))
            self.residual[rows].copy_(residual)
            return
        if model.is_last:
            hidden, residual = model.norm(hidden, residual)
        self.hidden_out[rows].copy_(hidden)
        self.residual_out[rows].copy_(residual)

    # --- capture ---------------------------------------------------------------------------

    def capture_all(self) -> int:
        """Captures every size not captured yet; returns how many sizes it captured."""
        todo = [size for size in reversed(self.sizes) if size not in self.graphs]
        for size in todo:
            self._capture(size)
        return len(todo)

    @torch.inference_mode()
    def _capture(self, size: int) -> None:
        """Warms up and captures the pieces of ``size`` over padding (slot -1: the warm-up
        writes no KV). The slots of a step being loaded are saved around it and restored.
        Capture errors are only this thread's (NCCL's threads keep working)."""
        start = time.perf_counter()
        saved = self.slot_mapping[:size].clone()
        self.slot_mapping[:size].fill_(-1)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.kv_cache.device)
        graphs = []
        for i in range(self.num_pieces):
            piece = functools.partial(self._piece, size, i)
            graph, _ = record(piece, self.pool, stream, "thread_local")
            graphs.append(graph)
        self.graphs[size] = graphs
        self.slot_mapping[:size].copy_(saved)
        logger.debug(
            "layers [%d, %d): captured %d pieces of %d tokens in %.1f ms",
            self.model.start,
            self.model.end,
            len(graphs),
            size,
            1e3 * (time.perf_counter() - start),
        )
