"""Turns a scheduler output into tensors, runs the model stage, and samples next tokens."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from attention.backends import get_backend
from attention.metadata import AttentionMetadata
from workers.config import EngineConfig, ModelConfig, parse_dtype
from workers.forward_context import ForwardContext, set_forward_context
from workers.model_loader import build_model
from workers.request import Request, SamplingParams
from workers.sampler import Sampler, TokenLogprobs
from workers.scheduler import ScheduledRequest, SchedulerOutput

logger = logging.getLogger(__name__)


@dataclass
class ModelInputs:
    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # [num_sampling] int64: last token of each sampling request
    sampling_requests: list[Request]


class ModelRunner:
    """Owns one worker's model stage, its KV-cache tensor and its sampler."""

    def __init__(
        self, config: EngineConfig, device: torch.device, layer_range: tuple[int, int] | None = None
    ) -> None:
        self.config = config
        self.device = device
        self.model_config: ModelConfig = config.model_config()
        self.dtype = parse_dtype(config.dtype, str(device))
        self.max_model_len = config.max_model_len(self.model_config)
        self.block_size = config.cache.block_size
        self.backend = get_backend(config.attention_backend, device)
        self.model = build_model(
            self.model_config,
            Path(config.model_path),
            self.backend,
            device,
            self.dtype,
            layer_range,
            config.load_format,
            max_positions=self.max_model_len,
        )
        self.sampler = Sampler(device, config.seed)
        self.kv_cache = torch.empty(0, device=device)

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
        of ``gpu_memory_utilization`` after weights and a profiled peak-activation forward."""
        cache = self.config.cache
        if cache.num_kv_blocks is not None:
            return cache.num_kv_blocks
        if self.device.type != "cuda":
            return int(cache.cpu_kv_cache_gb * 2**30) // self.block_bytes
        activation_peak = self._profile_activation_bytes()
        free, total = torch.cuda.mem_get_info(self.device)
        budget = total * cache.gpu_memory_utilization - (total - free) - activation_peak
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

    def prepare(self, out: SchedulerOutput) -> ModelInputs:
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        qsl, seq_lens, tables, logits_idx, sampling = [0], [], [], [], []
        for s in out.scheduled:
            r, c, n = s.request, s.request.num_computed_tokens, s.num_new_tokens
            ids.extend(_token_slice(r, c, c + n))
            positions.extend(range(c, c + n))
            slots.extend(r.block_ids[p // bs] * bs + p % bs for p in range(c, c + n))
            qsl.append(qsl[-1] + n)
            seq_lens.append(c + n)
            tables.append(r.block_ids)
            if s.samples:
                logits_idx.append(qsl[-1] - 1)
                sampling.append(r)
        width = max(len(t) for t in tables)
        table = [t + [0] * (width - len(t)) for t in tables]
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=_tensor(slots, torch.int64, dev),
            block_tables=_tensor(table, torch.int32, dev),
            seq_lens=_tensor(seq_lens, torch.int32, dev),
            query_start_loc=_tensor(qsl, torch.int32, dev),
            max_query_len=max(s.num_new_tokens for s in out.scheduled),
            max_seq_len=max(seq_lens),
        )
        return ModelInputs(
            _tensor(ids, torch.int64, dev),
            _tensor(positions, torch.int64, dev),
            meta,
            _tensor(logits_idx, torch.int64, dev),
            sampling,
        )

    @torch.inference_mode()
    def execute(
        self, out: SchedulerOutput
    ) -> tuple[dict[str, int], dict[str, TokenLogprobs | None]]:
        """Runs one step; returns sampled token ids (and logprobs) by request id."""
        inputs = self.prepare(out)
        with set_forward_context(ForwardContext(inputs.meta, self.kv_cache)):
            hidden, _ = self.model(inputs.positions, input_ids=inputs.input_ids)
        if not inputs.sampling_requests:
            return {}, {}
        logits = self.model.compute_logits(hidden[inputs.logits_indices])
        tokens, logprobs = self.sampler.sample(logits, inputs.sampling_requests)
        ids = [r.request_id for r in inputs.sampling_requests]
        return dict(zip(ids, tokens, strict=True)), dict(zip(ids, logprobs, strict=True))


def _token_slice(r: Request, lo: int, hi: int) -> list[int]:
    if hi <= r.num_prompt_tokens:
        return r.prompt_token_ids[lo:hi]
    if hi - lo == 1:
        return [r.token_id(lo)]
    return r.all_token_ids()[lo:hi]


def _tensor(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t
