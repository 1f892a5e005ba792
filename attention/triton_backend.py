"""The Triton backend: kernels/ on a CUDA device (or the Triton interpreter in tests)."""

from __future__ import annotations

import torch

from attention.backends import DECODE_GEMMS, AttentionBackend
from attention.metadata import AttentionMetadata
from kernels import skinny_gemm
from kernels.activation import silu_and_mul
from kernels.norm import rms_norm
from kernels.paged_attention import (
    paged_attention,
    paged_decode_attention,
    paged_prefill_attention,
)
from kernels.rope import rope_and_write_kv


class TritonBackend(AttentionBackend):
    """Fused RoPE + KV write, paged decode (split-K) and prefill attention, fused RMSNorm +
    residual, SiLU-and-mul. Each kernel checks its inputs and raises ValueError naming one.

    With ``decode_gemm="triton"``, batches of at most ``SKINNY_MAX_ROWS`` (16) tokens run their
    projections through kernels/skinny_gemm.py: the RMSNorm before q/k/v and gate/up and the
    SiLU-and-mul before down are fused into the matmul (one launch each, the weight read once).
    Larger batches (prefill) and ``decode_gemm="cublas"`` use torch's matmul. Raises ValueError
    for a ``decode_gemm`` not in ``DECODE_GEMMS``.
    """

    name = "triton"

    def __init__(self, decode_gemm: str = "cublas") -> None:
        if decode_gemm not in DECODE_GEMMS:
            raise ValueError(f"decode_gemm {decode_gemm!r} is not one of {list(DECODE_GEMMS)}")
        self.decode_gemm = decode_gemm

    def _skinny(self, x: torch.Tensor) -> bool:
        """True when ``x``'s rows go through the skinny GEMM."""
        return self.decode_gemm == "triton" and 0 < x.shape[0] <= skinny_gemm.SKINNY_MAX_ROWS

    def rope_and_write_kv(self, q, k, v, positions, cos_sin_cache, kv_cache, layer, slot_mapping):
        return rope_and_write_kv(q, k, v, positions, cos_sin_cache, kv_cache, layer, slot_mapping)

    def attention(
        self, q: torch.Tensor, kv_cache: torch.Tensor, layer: int, meta: AttentionMetadata
    ) -> torch.Tensor:
        scale = q.shape[-1] ** -0.5
        nd = meta.num_decodes
        if nd:  # a mixed step: its leading decodes through the decode kernel
            out = torch.empty_like(q)
            paged_decode_attention(
                q[:nd], kv_cache, layer, meta.block_tables[:nd], meta.seq_lens[:nd], scale,
                out=out[:nd],
            )  # fmt: skip
            paged_prefill_attention(
                q[nd:], kv_cache, layer, meta.block_tables[nd:], meta.seq_lens[nd:],
                meta.prefill_query_start_loc, meta.max_query_len, scale, out=out[nd:],
            )  # fmt: skip
            return out
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

    def linear(self, x, weight, bias=None):
        if self._skinny(x):
            return skinny_gemm.skinny_linear(x, weight, bias)
        return super().linear(x, weight, bias)

    def rms_norm_linear(self, x, norm_weight, eps, residual, weight, bias=None):
        if self._skinny(x):
            return skinny_gemm.rms_norm_linear(x, norm_weight, eps, weight, residual, bias)
        return super().rms_norm_linear(x, norm_weight, eps, residual, weight, bias)

    def silu_and_mul_linear(self, x, weight):
        if self._skinny(x):
            return skinny_gemm.silu_and_mul_linear(x, weight)
        return super().silu_and_mul_linear(x, weight)
