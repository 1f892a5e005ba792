"""Turns a scheduler output into tensors, runs the model stage, and samples next tokens."""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from attention.backends import get_backend
from attention.metadata import AttentionMetadata, host_tensor
from kernels import block_copy, paged_decode
from kernels.vmm import make_backend
from workers.config import EngineConfig, ModelConfig, parse_dtype, resolve_memory_backend
from workers.cuda_graphs import CudaGraphRunner, capture_sizes, graph_blocker, graph_key
from workers.forward_context import ForwardContext, set_forward_context
from workers.kv_pool import KVBlockFormat
from workers.memory import WorkerMemory
from workers.model_loader import build_model
from workers.models.llama import LlamaModel
from workers.piecewise_graphs import PiecewiseGraphs, piecewise_max_tokens
from workers.request import Request, SamplingParams
from workers.sampler import Sampler, TokenLogprobs, argmax_suffices
from workers.scheduler import ScheduledRequest, SchedulerOutput

logger = logging.getLogger(__name__)


@dataclass
class HostInputs:
    """One step's inputs as host lists, before they reach the device."""

    input_ids: list[int] = field(default_factory=list)  # [num_tokens]
    positions: list[int] = field(default_factory=list)  # [num_tokens]
    slot_mapping: list[int] = field(default_factory=list)  # [num_tokens]
    query_lens: list[int] = field(default_factory=list)  # [num_seqs] new tokens per request
    seq_lens: list[int] = field(default_factory=list)  # [num_seqs] context incl. new tokens
    block_tables: list[list[int]] = field(default_factory=list)  # [num_seqs][blocks]
    logits_indices: list[int] = field(default_factory=list)  # [num_sampling]
    sampling_requests: list[Request] = field(default_factory=list)


@dataclass
class ModelInputs:
    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # [num_sampling] int64: last token of each sampling request
    sampling_requests: list[Request]


class ModelRunner:
    """Owns one worker's model stage, its KV-cache tensor and its sampler.

    With ``memory_backend`` 'vmm' the weights and the KV cache live in ``memory``
    (:class:`WorkerMemory`: a VMM weight arena and KV pool; emulated on CPU), which drop and
    restore act on; with 'torch' the torch allocator holds them and ``memory`` is None.
    """

    def __init__(
        self, config: EngineConfig, device: torch.device, layer_range: tuple[int, int] | None = None
    ) -> None:
        self.config = config
        self.device = device
        self.model_config: ModelConfig = config.model_config()
        self.dtype = parse_dtype(config.dtype, str(device))
        self.max_model_len = config.max_model_len(self.model_config)
        self.block_size = config.cache.block_size
        self.backend = get_backend(config.attention_backend, device, config.decode_gemm)
        self.memory_backend = resolve_memory_backend(config.memory_backend, device)
        self.memory: WorkerMemory | None = None
        """VMM weights and KV (``drop_layers`` / ``restore_layers``); None on 'torch'."""
        logger.info("memory backend: %s", self.memory_backend)
        self.model = build_model(
            self.model_config,
            Path(config.model_path),
            self.backend,
            device,
            self.dtype,
            layer_range,
            config.load_format,
            max_positions=self.max_model_len,
            place=self._place_in_vmm if self.memory_backend == "vmm" else None,
        )
        self.sampler = Sampler(device, config.seed)
        self.kv_cache = torch.empty(0, device=device)
        self.cuda_graphs: CudaGraphRunner | None = None
        """Captured decode graphs (:meth:`capture_cuda_graphs`); None runs every step eagerly."""
        self._parked_graphs: tuple[CudaGraphRunner, tuple] | None = None
        """Graphs set aside by :meth:`park_cuda_graphs` with the :func:`graph_key` they were
        captured under."""
        self._graph_key: tuple | None = None
        self._force_eager = False
        self.graph_pool = torch.cuda.graph_pool_handle() if device.type == "cuda" else None
        """The memory pool every piecewise graph set of this worker shares (the full model's
        and each pipeline stage's: only one runs at a time, and none keeps memory alive
        between replays; workers/piecewise_graphs.py)."""
        self.stage_graphs: dict[tuple[int, int], tuple[tuple, Any]] = {}
        """Pipeline stages' decode graphs by layer range, with the key they were captured
        under (workers/pipeline.py, ``stage_graphs_for``): kept from one drop to the next."""

    @property
    def layers_per_block(self) -> int:
        return self.model.end - self.model.start

    @property
    def block_bytes(self) -> int:
        """Bytes of one KV block: every layer this stage holds, K and V."""
        cfg = self.model_config
        per_token = 2 * cfg.num_kv_heads * cfg.head_dim * self.dtype.itemsize
        return self.layers_per_block * self.block_size * per_token

    def determine_num_blocks(self) -> int:
        """KV blocks that fit: the override, ``cpu_kv_cache_gb`` on CPU, or on CUDA what is left
        of ``gpu_memory_utilization`` after weights and a profiled peak-activation forward (on
        VMM the KV chunks the profile committed count as KV, not as used memory)."""
        cache = self.config.cache
        if cache.num_kv_blocks is not None:
            return cache.num_kv_blocks
        if self.device.type != "cuda":
            return int(cache.cpu_kv_cache_gb * 2**30) // self.block_bytes
        activation_peak = self._profile_activation_bytes()
        free, total = torch.cuda.mem_get_info(self.device)
        budget = total * cache.gpu_memory_utilization - (total - free) - activation_peak
        if self.memory is not None:
            budget += self.memory.kv.mapped_bytes
        return max(0, int(budget) // self.block_bytes)

    def _profile_activation_bytes(self) -> int:
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        n = min(self.config.scheduler.max_num_batched_tokens, self.max_model_len)
        blocks = -(-n // self.block_size)
        self.allocate_kv_cache(blocks)
        req = Request("profile", [0] * n, SamplingParams(temperature=0.0), 1, frozenset())
        req.block_ids = list(range(blocks))
        self.execute(SchedulerOutput(scheduled=[ScheduledRequest(req, n)]))
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - base
        self.kv_cache = torch.empty(0, device=self.device)
        torch.cuda.empty_cache()
        return peak

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """torch: ``kv_cache`` becomes a new zeroed ``[num_blocks, ...]`` tensor (graphs are
        dropped: they recorded the old address). VMM: the KV pool grows to hold at least
        ``num_blocks`` blocks (whole 2 MiB slots, so maybe a few more; new blocks zeroed) and
        ``kv_cache`` views its live blocks at its fixed base; graphs stay valid."""
        if self.memory is not None:
            self.memory.ensure_kv_blocks(num_blocks)
            self.refresh_kv_cache()
            return
        cfg = self.model_config
        shape = (
            num_blocks,
            self.layers_per_block,
            2,
            self.block_size,
            cfg.num_kv_heads,
            cfg.head_dim,
        )
        self.kv_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.cuda_graphs = None  # graphs recorded the old cache's address

    def refresh_kv_cache(self) -> None:
        """VMM: points ``kv_cache`` at the KV pool's live blocks, after the pool grew or shrank
        (``memory.drop_layers`` / ``restore_layers``). The base address does not move, so
        captured graphs (which read the full-capacity view) stay valid."""
        if self.memory is not None:
            self.kv_cache = self.memory.kv.kv_cache

    @property
    def graph_kv_cache(self) -> torch.Tensor:
        """The KV tensor decode graphs capture: on VMM, while ``kv_cache`` is the KV pool's view
        of its live blocks, the pool's full-capacity view (same base and block shape), so the
        graphs stay valid as the pool grows; otherwise ``kv_cache`` itself (a torch tensor,
        or a view someone re-pointed ``kv_cache`` at, e.g. another layer count)."""
        kv = self.kv_cache
        if self.memory is None:
            return kv
        full = self.memory.kv.kv_cache_full
        same = kv.data_ptr() == full.data_ptr() and kv.shape[1:] == full.shape[1:]
        return full if same and kv.dtype == full.dtype else kv

    def close(self) -> None:
        """Drops the graphs and the KV cache and, on VMM, releases every chunk (weights and
        KV). The parameters move to the meta device first, so any later use raises instead of
        reading freed memory: the runner cannot run again."""
        self.cuda_graphs = self._parked_graphs = None
        self.stage_graphs.clear()
        self.kv_cache = torch.empty(0, device=self.device)
        if self.memory is not None:
            self.model.to("meta")
            self.memory.close()
            self.memory = None

    def _place_in_vmm(self, model: LlamaModel) -> None:
        """``build_model``'s ``place`` hook on 'vmm': binds the meta model's parameters to a
        VMM weight arena on this device (one chunk per layer) beside a one-block KV pool that
        :meth:`allocate_kv_cache` grows; the KV range reserves the device's memory size."""
        cfg = self.model_config
        layers = model.end - model.start
        fmt = KVBlockFormat(layers, self.block_size, cfg.num_kv_heads, cfg.head_dim, self.dtype)
        if self.device.type == "cuda":  # torch's context current first (memory-systems §6.5)
            torch.zeros(1, device=self.device)
        backend = make_backend(self.device)
        slots = -(-fmt.block_bytes // backend.chunk_bytes)
        max_slots = backend.mem_get_info()[1] // backend.chunk_bytes
        try:
            memory = WorkerMemory.for_model(
                model, self.dtype, fmt, slots, backend, self.device, max_slots
            )
        except Exception:
            backend.close()
            raise
        memory.owns_backend = True
        self.memory = memory

    @torch.inference_mode()
    def warm_up_kernels(self) -> None:
        """Compiles, on CUDA, the live KV exchange's copies (``kernels.block_copy.warm_up``)
        and, with the Triton backend, the attention kernel variants a server can launch
        (``kernels.paged_decode.warm_up``), so that none compiles between two tokens while
        serving (the Engine calls it at start-up)."""
        if self.device.type != "cuda":
            return
        cfg, start = self.model_config, time.perf_counter()
        fmt = (2, self.block_size, cfg.num_kv_heads, cfg.head_dim)  # past (blocks, layers)
        n = block_copy.warm_up(self.device, self.dtype, fmt)
        if self.backend.name == "triton":
            n += paged_decode.warm_up(
                self.device, self.dtype, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                self.block_size,
            )  # fmt: skip
        logger.info(
            "Triton: %d attention and KV-copy variants ready (compiled or cached) in %.2f s",
            n,
            time.perf_counter() - start,
        )

    @torch.inference_mode()
    def capture_cuda_graphs(self) -> None:
        """Captures the decode graphs over the allocated KV cache (call once, after
        :meth:`allocate_kv_cache`; the Engine does). Logs why and stays eager on CPU, with
        ``enforce_eager``, with the torch backend, or on a pipeline stage."""
        full = self.model.is_first and self.model.is_last
        reason = graph_blocker(self.device, self.config.enforce_eager, self.backend.name, full)
        if reason is not None:
            logger.info("CUDA graphs off: %s", reason)
            return
        parked, self._parked_graphs = self._parked_graphs, None
        key = graph_key(self.model, self.graph_kv_cache)
        if parked is not None and parked[1] == key:
            self.cuda_graphs, self._graph_key = parked
            if self.cuda_graphs.piecewise is not None:  # the attention between the pieces
                self.cuda_graphs.piecewise.model = self.model
            logger.info("CUDA graphs: kept (weights and KV cache are where they were captured)")
            return
        sched = self.config.scheduler
        sizes = capture_sizes(sched.max_num_seqs, sched.max_num_batched_tokens)
        width = -(-self.max_model_len // self.block_size)
        start, free = time.perf_counter(), self.device_free_bytes()
        tokens = piecewise_max_tokens(sched, stage=False)
        pieces = PiecewiseGraphs(self.model, self.graph_kv_cache, tokens, self.graph_pool)
        graphs = CudaGraphRunner(self.model, self.graph_kv_cache, sizes, width, pieces)
        graphs.capture()
        self.cuda_graphs, self._graph_key = graphs, key
        logger.info(
            "CUDA graphs: captured decode batch sizes %s and the pieces of steps of %s "
            "tokens in %.1f s, %.0f MiB of device memory",
            sizes,
            pieces.sizes,
            time.perf_counter() - start,
            (free - self.device_free_bytes()) / 2**20,
        )

    def device_free_bytes(self) -> int:
        """Free device memory (bytes, ``cudaMemGetInfo``); 0 off CUDA."""
        if self.device.type != "cuda":
            return 0
        return torch.cuda.mem_get_info(self.device)[0]

    def park_cuda_graphs(self) -> None:
        """Sets the decode graphs aside (no replay) while the model or the KV cache is re-viewed
        (a drop); :meth:`capture_cuda_graphs` brings them back if nothing they read moved."""
        if self.cuda_graphs is not None:
            self._parked_graphs = (self.cuda_graphs, self._graph_key)
        self.cuda_graphs = self._graph_key = None

    @contextlib.contextmanager
    def eager(self) -> Iterator[None]:
        """Runs every step inside the block eagerly, graphs or not (benchmarks, tests)."""
        previous, self._force_eager = self._force_eager, True
        try:
            yield
        finally:
            self._force_eager = previous

    def gather(self, out: SchedulerOutput) -> HostInputs:
        """Collects one step's token ids, positions, slots and block tables as host lists."""
        bs = self.block_size
        h = HostInputs()
        for s in out.scheduled:
            r, c, n = s.request, s.start, s.num_new_tokens
            h.input_ids.extend(_token_slice(r, c, c + n))
            h.positions.extend(range(c, c + n))
            ids = r.block_ids
            if len(ids) * bs >= c + n:
                h.slot_mapping.extend(ids[p // bs] * bs + p % bs for p in range(c, c + n))
            else:  # a pre-drop request in a pipeline step: its KV is not in these blocks
                h.slot_mapping.extend([-1] * n)
            h.query_lens.append(n)
            h.seq_lens.append(c + n)
            h.block_tables.append(r.block_ids)
            if s.samples:
                h.logits_indices.append(len(h.input_ids) - 1)
                h.sampling_requests.append(r)
        return h

    def prepare(self, out: SchedulerOutput) -> ModelInputs:
        return self._to_device(self.gather(out))

    def _to_device(self, h: HostInputs) -> ModelInputs:
        dev = self.device
        meta = AttentionMetadata.from_host(
            h.slot_mapping, h.block_tables, h.query_lens, h.seq_lens, dev
        )
        return ModelInputs(
            host_tensor(h.input_ids, torch.int64, dev),
            host_tensor(h.positions, torch.int64, dev),
            meta,
            host_tensor(h.logits_indices, torch.int64, dev),
            h.sampling_requests,
        )

    @torch.inference_mode()
    def profile_decode(self, batches: Sequence[int], repeats: int = 3) -> dict[int, float]:
        """Seconds of one decode step of the whole model (every layer, LM head and argmax) at
        each batch size in ``batches``: the planner's start-up profile (planner/cost_model.py).

        Rows are padding (slot -1, context length 0: no KV is read or written), so the time is
        the weights' and the launches', the part a drop changes; attention over long contexts
        is not in it. Replays the captured graph of each size where there is one (batches it
        does not hold are left out), else runs the same step eagerly; the mean of ``repeats``
        runs after one warm-up. Raises ValueError for a batch < 1.
        """
        if any(b < 1 for b in batches):
            raise ValueError(f"batch sizes must be >= 1, got {list(batches)}")
        graphs, eager = self.cuda_graphs, self.cuda_graphs is None
        if eager:  # the step a graph records, run eagerly (nothing captured)
            width = -(-self.max_model_len // self.block_size)
            graphs = CudaGraphRunner(self.model, self.graph_kv_cache, batches, width)
        else:
            batches = [b for b in batches if b in graphs.graphs]
        times = {}
        for b in batches:
            graphs.inputs.pad(b)
            run = functools.partial(graphs.forward_static, b) if eager else graphs.graphs[b].replay
            run()  # warm-up: compiles, picks algorithms
            _sync(self.device)
            start = time.perf_counter()
            for _ in range(repeats):
                run()
            _sync(self.device)
            times[b] = (time.perf_counter() - start) / repeats
        return times

    @torch.inference_mode()
    def profile_prefill(self, num_tokens: int, repeats: int = 2) -> float:
        """Seconds of one prefill step of ``num_tokens`` prompt tokens (one sequence, every
        layer, eager): with the decode profile, the planner's start-up profile of what the
        worker can compute (``WorkerInfo.prefill_tokens_per_s``). It writes the KV of blocks
        ``0 ..``, so call it before any request runs. The mean of ``repeats`` runs after one
        warm-up. Raises ValueError when ``num_tokens`` is < 1 or more than the KV cache holds.
        """
        bs, capacity = self.block_size, self.kv_cache.shape[0] * self.block_size
        if not 1 <= num_tokens <= capacity:
            raise ValueError(f"num_tokens must be in [1, {capacity}], got {num_tokens}")
        h = HostInputs(
            input_ids=[0] * num_tokens,
            positions=list(range(num_tokens)),
            slot_mapping=list(range(num_tokens)),  # blocks 0, 1, ... in order
            query_lens=[num_tokens],
            seq_lens=[num_tokens],
            block_tables=[list(range(-(-num_tokens // bs)))],
        )
        self.forward(h)  # warm-up: compiles, picks algorithms
        _sync(self.device)
        start = time.perf_counter()
        for _ in range(repeats):
            self.forward(h)
        _sync(self.device)
        return (time.perf_counter() - start) / repeats

    def forward(self, h: HostInputs) -> torch.Tensor:
        """[num_tokens, hidden] final-norm states of one step, run eagerly."""
        return self._forward_eager(self._to_device(h))

    def _forward_eager(self, inputs: ModelInputs) -> torch.Tensor:
        with set_forward_context(ForwardContext(inputs.meta, self.kv_cache)):
            hidden, _ = self.model(inputs.positions, input_ids=inputs.input_ids)
        return hidden

    def _forward_step(self, inputs: ModelInputs) -> torch.Tensor:
        """[num_tokens, hidden] final-norm states of a step that replays no decode graph:
        through the piecewise graphs when there are some and the step fits them (a view of
        their static output, overwritten by the next step), else eagerly."""
        graphs = None if self._force_eager else self.cuda_graphs
        pieces = None if graphs is None else graphs.piecewise
        if pieces is not None and pieces.size_for(inputs.positions.shape[0]) is not None:
            hidden, _ = pieces.run(inputs.meta, inputs.positions, inputs.input_ids)
            return hidden
        return self._forward_eager(inputs)

    def replay_size(self, out: SchedulerOutput) -> int | None:
        """The captured size this step replays, or None when it runs eagerly (no graphs,
        inside :meth:`eager`, or not a decode-only step that a captured size holds)."""
        graphs = self.cuda_graphs
        if graphs is None or self._force_eager:
            return None
        return graphs.size_for(out.scheduled)

    @torch.inference_mode()
    def execute(
        self, out: SchedulerOutput
    ) -> tuple[dict[str, int], dict[str, TokenLogprobs | None]]:
        """Runs one step; returns sampled token ids (and logprobs) by request id."""
        size = self.replay_size(out)
        if size is not None:
            return self._execute_replay(out.scheduled, size)
        if self.cuda_graphs is not None:
            self.cuda_graphs.host_gap.reset()
        h = self.gather(out)
        hidden = self._forward_step(self._to_device(h))
        if not h.sampling_requests:
            return {}, {}
        logits_indices = host_tensor(h.logits_indices, torch.int64, self.device)
        logits = self.model.compute_logits(hidden[logits_indices])
        tokens, logprobs = self.sampler.sample(logits, h.sampling_requests)
        ids = [r.request_id for r in h.sampling_requests]
        return dict(zip(ids, tokens, strict=True)), dict(zip(ids, logprobs, strict=True))

    def _execute_replay(
        self, scheduled: list[ScheduledRequest], size: int
    ) -> tuple[dict[str, int], dict[str, TokenLogprobs | None]]:
        """A decode step replayed on the graph of ``size``. When every sampling request takes
        the argmax of its raw logits (:func:`argmax_suffices`), the step's only sync is the
        copy of the captured argmax ids; otherwise the sampler runs on the captured logits."""
        graphs = self.cuda_graphs
        outputs = graphs.run(scheduled, size)
        rows = [i for i, s in enumerate(scheduled) if s.samples]
        requests = [scheduled[i].request for i in rows]
        every_row = len(rows) == len(scheduled)
        if not requests:
            tokens, logprobs = [], []
        elif all(argmax_suffices(r) for r in requests):
            picked = graphs.read_greedy(outputs.greedy)
            tokens = picked if every_row else [picked[i] for i in rows]
            logprobs = [None] * len(rows)
        else:
            logits = (
                outputs.logits
                if every_row
                else outputs.logits[host_tensor(rows, torch.int64, self.device)]
            )
            tokens, logprobs = self.sampler.sample(logits, requests)
        graphs.host_gap.ready()
        ids = [r.request_id for r in requests]
        return dict(zip(ids, tokens, strict=True)), dict(zip(ids, logprobs, strict=True))


def _token_slice(r: Request, lo: int, hi: int) -> list[int]:
    if hi <= r.num_prompt_tokens:
        return r.prompt_token_ids[lo:hi]
    if hi - lo == 1:
        return [r.token_id(lo)]
    return r.all_token_ids()[lo:hi]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
