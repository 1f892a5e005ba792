"""The Triton backend: kernels/ on a CUDA device (or the Triton interpreter in tests)."""

from __future__ import annotations

import torch

from attention.backends import AttentionBackend
from attention.metadata import AttentionMetadata
from kernels.activation import silu_and_mul
from kernels.norm import rms_norm
from kernels.paged_attention import paged_attention, paged_decode_attention
from kernels.rope import rope_and_write_kv


class TritonBackend(AttentionBackend):
    """Fused RoPE + KV write, paged decode (split-K) and prefill attention, fused RMSNorm +
    residual, SiLU-and-mul. Each kernel checks its inputs and raises ValueError naming one."""

    name = "triton"

    def rope_and_write_kv(self, q, k, v, positions, cos_sin_cache, kv_cache, layer, slot_mapping):
        return rope_and_write_kv(q, k, v, positions, cos_sin_cache, kv_cache, layer, slot_mapping)

    def attention(
        self, q: torch.Tensor, kv_cache: torch.Tensor, layer: int, meta: AttentionMetadata
    ) -> torch.Tensor:
        scale = q.shape[-1] ** -0.5
        if meta.decode_num_splits is not None and meta.is_decode_only:
            return paged_decode_attention(
                q,
                kv_cache,
                layer,
                meta.block_tables,
                meta.seq_lens,
                scale,
                num_splits=meta.decode_num_splits,
            )
        return paged_attention(
            q,
            kv_cache,
            layer,
            meta.block_tables,
            meta.seq_lens,
            meta.query_start_loc,
            scale,
            max_query_len=meta.max_query_len,
        )

    def rms_norm(self, x, weight, eps, residual):
        return rms_norm(x, weight, eps, residual)

    def silu_and_mul(self, x):
        return silu_and_mul(x)
