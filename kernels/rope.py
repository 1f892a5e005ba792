"""Rotary position embedding (RoFormer, Su et al. 2021) with Llama-3 frequency scaling."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kernels._triton import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_device,
    check_shape,
    check_tensor,
    jit,
    next_pow2,
    tl,
)
from kernels.paged_attention import _store_kv_token, check_write_kv_args


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 ``rope_scaling`` ({"rope_type": "llama3", ...} in config.json)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2], float32, with Llama-3 scaling applied if given.

    Llama-3 scaling (Meta's reference ``apply_scaling``): wavelengths longer than
    ``original_max / low_freq_factor`` are divided by ``factor``, shorter than
    ``original_max / high_freq_factor`` are kept, and the band between is interpolated.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling is None:
        return inv_freq.float()
    old = scaling.original_max_position_embeddings
    low_wavelen = old / scaling.low_freq_factor
    high_wavelen = old / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    smooth = (old / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    return torch.where(mid, blended, scaled).float()


def rope_cos_sin_cache(
    head_dim: int, max_positions: int, theta: float, scaling: RopeScaling | None = None
) -> torch.Tensor:
    """Returns [max_positions, head_dim] float32: ``cos`` in the first half, ``sin`` in the second."""
    inv_freq = rope_inv_freq(head_dim, theta, scaling)
    freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


def apply_rope_ref(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    positions: torch.Tensor,  # [num_tokens] int64
    cos_sin_cache: torch.Tensor,  # [max_positions, head_dim] float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half ("neox"/HF) RoPE of q and k at ``positions``; returns new tensors in q.dtype."""
    half = q.shape[-1] // 2
    cs = cos_sin_cache[positions]
    cos, sin = cs[:, None, :half], cs[:, None, half:]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x[..., :half].float(), x[..., half:].float()
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


@jit
def _rotate_heads(
    x_ptr,  # [num_tokens, num_heads, head_dim] (token and head strides given)
    out_ptr,  # [num_tokens, num_heads, head_dim], contiguous
    token,
    stride_token,
    stride_head,
    num_heads,
    half,
    cos,  # [BLOCK_HALF] float32
    sin,  # [BLOCK_HALF] float32
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    """Rotate-half RoPE of one token's heads; stores and returns both halves in x's dtype."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask = (offs_h[:, None] < num_heads) & (offs_d[None, :] < half)
    x_ptrs = x_ptr + token * stride_token + offs_h[:, None] * stride_head + offs_d[None, :]
    x1 = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptrs + half, mask=mask, other=0.0).to(tl.float32)
    o1 = (x1 * cos[None, :] - x2 * sin[None, :]).to(x_ptr.dtype.element_ty)
    o2 = (x2 * cos[None, :] + x1 * sin[None, :]).to(x_ptr.dtype.element_ty)
    out_ptrs = out_ptr + (token * num_heads + offs_h[:, None]) * (2 * half) + offs_d[None, :]
    tl.store(out_ptrs, o1, mask=mask)
    tl.store(out_ptrs + half, o2, mask=mask)
    return o1, o2


# positions and slots may be slices of a packed step buffer: no alignment variants
@jit(do_not_specialize=["positions_ptr", "slot_mapping_ptr"])
def _rope_kernel(
    q_ptr,  # [num_tokens, num_heads, head_dim]
    k_ptr,  # [num_tokens, num_kv_heads, head_dim]
    v_ptr,  # [num_tokens, num_kv_heads, head_dim]; read only if WRITE_KV
    positions_ptr,  # [num_tokens] int32/int64
    cos_sin_ptr,  # [max_positions, head_dim] float32: cos in the first half, sin in the second
    q_out_ptr,  # [num_tokens, num_heads, head_dim], contiguous
    k_out_ptr,  # [num_tokens, num_kv_heads, head_dim], contiguous
    kv_ptr,  # [num_blocks, layers_per_block, 2, block_size, num_kv_heads, head_dim]; if WRITE_KV
    slot_mapping_ptr,  # [num_tokens] int32/int64, -1 skips the token; read only if WRITE_KV
    q_stride_token,
    q_stride_head,
    k_stride_token,
    k_stride_head,
    v_stride_token,
    v_stride_head,
    layer_offset,  # layer * kv_cache.stride(1)
    stride_block,  # kv_cache strides, dims 0, 2, 3 and 4
    stride_kv,
    stride_token,
    stride_head,
    num_heads,
    num_kv_heads,
    half,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    WRITE_KV: tl.constexpr,
):
    """One program per token: rotates all its q and k heads, then writes rotated k and v."""
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_HALF)
    cos = tl.load(cos_sin_ptr + pos * (2 * half) + offs_d, mask=offs_d < half, other=0.0)
    sin = tl.load(cos_sin_ptr + pos * (2 * half) + half + offs_d, mask=offs_d < half, other=0.0)
    _rotate_heads(
        q_ptr, q_out_ptr, token, q_stride_token, q_stride_head, num_heads, half, cos, sin,
        BLOCK_HQ, BLOCK_HALF,
    )  # fmt: skip
    k1, k2 = _rotate_heads(
        k_ptr, k_out_ptr, token, k_stride_token, k_stride_head, num_kv_heads, half, cos, sin,
        BLOCK_HK, BLOCK_HALF,
    )  # fmt: skip
    if WRITE_KV:
        slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
        if slot >= 0:
            offs_h = tl.arange(0, BLOCK_HK)
            mask = (offs_h[:, None] < num_kv_heads) & (offs_d[None, :] < half)
            v_ptrs = v_ptr + token * v_stride_token + offs_h[:, None] * v_stride_head
            v_ptrs += offs_d[None, :]
            v1 = tl.load(v_ptrs, mask=mask, other=0.0)
            v2 = tl.load(v_ptrs + half, mask=mask, other=0.0)
            sb, skv, st, sh = stride_block, stride_kv, stride_token, stride_head
            _store_kv_token(
                kv_ptr, k1, v1, slot, layer_offset, sb, skv, st, sh, offs_h, offs_d, mask,
                BLOCK_SIZE,
            )  # fmt: skip
            _store_kv_token(
                kv_ptr, k2, v2, slot, layer_offset, sb, skv, st, sh, offs_h, offs_d + half,
                mask, BLOCK_SIZE,
            )  # fmt: skip


def _check_rope_args(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> torch.device:
    device = check_device("q", q)
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES)
    num_tokens, _, head_dim = q.shape
    check_tensor("k", k, ndim=3, dtypes=(q.dtype,), device=device)
    if k.shape[0] != num_tokens or k.shape[2] != head_dim:
        raise ValueError(f"k shape {tuple(k.shape)} does not match q's {tuple(q.shape)}")
    if head_dim % 2:
        raise ValueError(f"q: head_dim must be even, got {head_dim}")
    check_tensor("positions", positions, ndim=1, dtypes=INDEX_DTYPES, device=device)
    check_shape("positions", positions, (num_tokens,))
    check_tensor(
        "cos_sin_cache", cos_sin_cache, ndim=2, dtypes=(torch.float32,), device=device,
        contiguous=True,
    )  # fmt: skip
    if cos_sin_cache.shape[1] != head_dim:
        raise ValueError(
            f"cos_sin_cache must be [max_positions, {head_dim}], got {cos_sin_cache.shape}"
        )
    return device


def _launch_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    kv: tuple[torch.Tensor, torch.Tensor, int, torch.Tensor] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launches ``_rope_kernel``; ``kv`` is ``(v, kv_cache, layer, slot_mapping)`` or None."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    q_rot = torch.empty((num_tokens, num_heads, head_dim), dtype=q.dtype, device=q.device)
    k_rot = torch.empty((num_tokens, num_kv_heads, head_dim), dtype=k.dtype, device=q.device)
    if num_tokens == 0:
        return q_rot, k_rot
    # Without a cache the kernel reads none of v, kv_cache, slot_mapping: any tensors will do.
    v, kv_cache, layer, slot_mapping = kv if kv is not None else (k, q, 0, positions)
    cache_strides = kv_cache.stride() if kv is not None else (0,) * 6
    block_size = kv_cache.shape[3] if kv is not None else 1
    _rope_kernel[(num_tokens,)](
        q, k, v, positions, cos_sin_cache, q_rot, k_rot, kv_cache, slot_mapping,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        layer * cache_strides[1], cache_strides[0], cache_strides[2], cache_strides[3],
        cache_strides[4], num_heads, num_kv_heads, head_dim // 2,
        BLOCK_SIZE=block_size,
        BLOCK_HQ=next_pow2(num_heads),
        BLOCK_HK=next_pow2(num_kv_heads),
        BLOCK_HALF=next_pow2(head_dim // 2),
        WRITE_KV=kv is not None,
        num_warps=4,
    )  # fmt: skip
    return q_rot, k_rot


def apply_rope(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    positions: torch.Tensor,  # [num_tokens] int32/int64
    cos_sin_cache: torch.Tensor,  # [max_positions, head_dim] float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`apply_rope_ref`: rotate-half RoPE in float32.

    ``q`` and ``k`` share a float dtype and may be strided views (unit last stride), e.g. the
    q and k parts of a fused QKV projection. Returns new contiguous ``(q_rot, k_rot)`` in that
    dtype. Positions are not range-checked (no device sync). Raises ValueError naming a bad
    argument, RuntimeError without Triton.
    """
    _check_rope_args(q, k, positions, cos_sin_cache)
    return _launch_rope(q, k, positions, cos_sin_cache, None)


def rope_and_write_kv(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    positions: torch.Tensor,  # [num_tokens] int32/int64
    cos_sin_cache: torch.Tensor,  # [max_positions, head_dim] float32
    kv_cache: torch.Tensor,  # [num_blocks, layers_per_block, 2, block_size, num_kv_heads, head_dim]
    layer: int,
    slot_mapping: torch.Tensor,  # [num_tokens] int32/int64; -1 skips the token
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused :func:`apply_rope_ref` then :func:`write_kv_ref` of the rotated k and of v.

    One pass over q, k and v: the rotated k is written to the cache from registers, so the
    cache holds exactly ``write_kv_ref(k_rot, v, ...)`` (k_rot rounded to k.dtype, then cast
    to the cache dtype). Returns ``(q_rot, k_rot)``; the cache is updated in place. Arguments
    as in :func:`apply_rope` and :func:`~kernels.paged_attention.write_kv`, with v in q's dtype.
    Raises ValueError naming a bad argument, RuntimeError without Triton.
    """
    _check_rope_args(q, k, positions, cos_sin_cache)
    check_write_kv_args(k, v, kv_cache, layer, slot_mapping)
    if v.dtype != q.dtype:
        raise ValueError(f"v dtype must be q's ({q.dtype}), got {v.dtype}")
    return _launch_rope(q, k, positions, cos_sin_cache, (v, kv_cache, layer, slot_mapping))
