"""Attention backends, chosen by name: the torch reference (CPU, CI) and Triton (GPU).

A backend owns attention over the paged KV cache and the fused operations around it (RoPE plus
KV write, RMSNorm plus residual, SiLU-and-mul, and the projections after a norm or the
activation), so a model layer calls one object and the CPU path runs the same engine with the
reference kernels.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F

from attention.metadata import AttentionMetadata
from kernels.activation import silu_and_mul_ref
from kernels.norm import rms_norm_ref
from kernels.paged_attention import paged_attention_ref, write_kv_ref
from kernels.rope import apply_rope_ref


class AttentionBackend(ABC):
    """Contract: tensors arrive contiguous on the model's device; ``layer`` indexes inside a KV
    block (``0 <= layer < layers_per_block``); the cache layout is kernels/paged_attention.py's.
    """

    name: str

    @abstractmethod
    def rope_and_write_kv(
        self,
        q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
        positions: torch.Tensor,  # [num_tokens] int64
        cos_sin_cache: torch.Tensor,  # [max_positions, head_dim] float32
        kv_cache: torch.Tensor,
        layer: int,
        slot_mapping: torch.Tensor,  # [num_tokens] int64
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotates q and k, writes rotated k and v to their slots; returns (q, k) rotated."""

    @abstractmethod
    def attention(
        self, q: torch.Tensor, kv_cache: torch.Tensor, layer: int, meta: AttentionMetadata
    ) -> torch.Tensor:
        """Causal attention of q [num_tokens, num_heads, head_dim] over the paged context."""

    @abstractmethod
    def rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (RMSNorm(x + residual), x + residual)."""

    @abstractmethod
    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        """[num_tokens, 2d] -> [num_tokens, d]."""

    def linear(
        self,
        x: torch.Tensor,  # [num_tokens, in_features]
        weight: torch.Tensor,  # [out_features, in_features]: an nn.Linear weight
        bias: torch.Tensor | None = None,  # [out_features]
    ) -> torch.Tensor:
        """``x @ weight.T + bias`` (``nn.Linear``'s forward): [num_tokens, out_features]."""
        return F.linear(x, weight, bias)

    def rms_norm_linear(
        self,
        x: torch.Tensor,  # [num_tokens, hidden]
        norm_weight: torch.Tensor,  # [hidden]
        eps: float,
        residual: torch.Tensor | None,  # [num_tokens, hidden]
        weight: torch.Tensor,  # [out_features, hidden]
        bias: torch.Tensor | None = None,  # [out_features]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A pre-norm and the projection after it: returns
        ``(linear(RMSNorm(x + residual)), x + residual)``. By default :meth:`rms_norm` then
        :meth:`linear`; a backend may fuse them, equal up to rounding."""
        normed, residual = self.rms_norm(x, norm_weight, eps, residual)
        return self.linear(normed, weight, bias), residual

    def silu_and_mul_linear(
        self,
        x: torch.Tensor,  # [num_tokens, 2d]: [gate | up]
        weight: torch.Tensor,  # [out_features, d]
    ) -> torch.Tensor:
        """``linear(silu_and_mul(x))``: [num_tokens, out_features]. By default the two calls; a
        backend may fuse them, equal up to rounding."""
        return self.linear(self.silu_and_mul(x), weight)


class TorchBackend(AttentionBackend):
    """The torch references: exact, slow, runs anywhere."""

    name = "torch"

    def rope_and_write_kv(self, q, k, v, positions, cos_sin_cache, kv_cache, layer, slot_mapping):
        q, k = apply_rope_ref(q, k, positions, cos_sin_cache)
        write_kv_ref(k, v, kv_cache, layer, slot_mapping)
        return q, k

    def attention(self, q, kv_cache, layer, meta):
        scale = q.shape[-1] ** -0.5
        return paged_attention_ref(
            q, kv_cache, layer, meta.block_tables, meta.seq_lens, meta.query_start_loc, scale
        )

    def rms_norm(self, x, weight, eps, residual):
        return rms_norm_ref(x, weight, eps, residual)

    def silu_and_mul(self, x):
        return silu_and_mul_ref(x)


def _triton_backend(decode_gemm: str) -> AttentionBackend:
    from attention.triton_backend import TritonBackend

    return TritonBackend(decode_gemm)


_REGISTRY = {"torch": lambda decode_gemm: TorchBackend(), "triton": _triton_backend}

DECODE_GEMMS = ("cublas", "triton")
"""Matmuls of small (decode) batches on the triton backend: torch's (cuBLAS on CUDA), or
kernels/skinny_gemm.py with the norm or activation before each projection fused in."""


def get_backend(name: str, device: torch.device, decode_gemm: str = "cublas") -> AttentionBackend:
    """``auto`` picks triton on CUDA and torch elsewhere. ``decode_gemm`` (one of
    :data:`DECODE_GEMMS`) is the triton backend's choice of matmul for batches of at most 16
    tokens; the torch backend always uses torch's. Raises ValueError listing the valid names of
    a bad ``name`` or ``decode_gemm``."""
    if decode_gemm not in DECODE_GEMMS:
        raise ValueError(f"decode_gemm {decode_gemm!r} is not one of {list(DECODE_GEMMS)}")
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name not in _REGISTRY:
        raise ValueError(f"attention backend {name!r} is not one of {sorted(_REGISTRY) + ['auto']}")
    return _REGISTRY[name](decode_gemm)
