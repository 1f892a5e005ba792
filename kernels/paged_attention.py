"""Attention over a paged KV cache, and the KV-cache write through a slot mapping.

KV-cache layout (DESIGN.md §5, KunServe's): one tensor per worker,

    kv_cache: [num_blocks, layers_per_block, 2, block_size, num_kv_heads, head_dim]

A block holds every layer the worker computes, so that after a drop a free block can be re-read
as several blocks of fewer layers with no copy. ``layer`` below is the index inside a block
(0 <= layer < layers_per_block), and ``[:, :, 0]`` is K, ``[:, :, 1]`` is V. A token's slot is
``block_id * block_size + offset``; block tables map a sequence's logical block i to a block id.

Torch references (``*_ref``) and their Triton twins: :func:`write_kv` here,
:func:`paged_attention` (dispatching to :func:`~kernels.paged_decode.paged_decode_attention`
and :func:`~kernels.paged_prefill.paged_prefill_attention`, re-exported here), and the fused
``rope_and_write_kv`` in :mod:`kernels.rope`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._triton import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    check_device,
    check_kv_cache,
    check_shape,
    check_tensor,
    jit,
    next_pow2,
    tl,
)
from kernels.paged_decode import paged_decode_attention
from kernels.paged_prefill import paged_prefill_attention

__all__ = [
    "gather_kv_ref",
    "paged_attention",
    "paged_attention_ref",
    "paged_decode_attention",
    "paged_prefill_attention",
    "write_kv",
    "write_kv_ref",
]


def write_kv_ref(
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    kv_cache: torch.Tensor,  # [num_blocks, layers_per_block, 2, block_size, num_kv_heads, head_dim]
    layer: int,
    slot_mapping: torch.Tensor,  # [num_tokens] int64; -1 skips the token (padding)
) -> None:
    """Writes each token's K and V into its slot, in place."""
    block_size = kv_cache.shape[3]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    blocks, offsets = slots // block_size, slots % block_size
    kv_cache[blocks, layer, 0, offsets] = k[valid].to(kv_cache.dtype)
    kv_cache[blocks, layer, 1, offsets] = v[valid].to(kv_cache.dtype)


def gather_kv_ref(
    kv_cache: torch.Tensor,  # [num_blocks, layers_per_block, 2, block_size, num_kv_heads, head_dim]
    layer: int,
    block_table: torch.Tensor,  # [max_blocks_per_seq] int32
    seq_len: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence's K and V, each [seq_len, num_kv_heads, head_dim], as contiguous copies."""
    block_size = kv_cache.shape[3]
    num_blocks = (seq_len + block_size - 1) // block_size
    ids = block_table[:num_blocks].long()
    kv = kv_cache[ids, layer]  # [n, 2, block_size, Hkv, D]
    k = kv[:, 0].reshape(-1, *kv.shape[-2:])[:seq_len]
    v = kv[:, 1].reshape(-1, *kv.shape[-2:])[:seq_len]
    return k, v


def paged_attention_ref(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [num_blocks, layers_per_block, 2, block_size, num_kv_heads, head_dim]
    layer: int,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32: context length including this step's tokens
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32: prefix sums of query lengths
    scale: float,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its whole paged context.

    Sequence i's queries are ``q[query_start_loc[i]:query_start_loc[i+1]]``; they sit at the
    last ``q_len`` positions of its ``seq_lens[i]`` tokens, whose K/V (new ones included) must
    already be in the cache. Covers decode (q_len 1), prefill and chunked prefill over a cached
    prefix alike. GQA: query head h reads KV head ``h // (num_heads // num_kv_heads)``.
    Computed in float32; returns [num_tokens, num_heads, head_dim] in q.dtype.
    """
    out = torch.empty_like(q)
    num_heads = q.shape[1]
    starts = query_start_loc.tolist()
    for i, seq_len in enumerate(seq_lens.tolist()):
        lo, hi = starts[i], starts[i + 1]
        if hi == lo:
            continue
        k, v = gather_kv_ref(kv_cache, layer, block_tables[i], seq_len)
        group = num_heads // k.shape[1]
        k = k.float().repeat_interleave(group, dim=1).transpose(0, 1)  # [H, S, D]
        v = v.float().repeat_interleave(group, dim=1).transpose(0, 1)
        qi = q[lo:hi].float().transpose(0, 1)  # [H, q_len, D]
        q_len = hi - lo
        pos_q = torch.arange(seq_len - q_len, seq_len, device=q.device)[:, None]
        mask = torch.arange(seq_len, device=q.device)[None, :] <= pos_q  # [q_len, S]
        o = F.scaled_dot_product_attention(qi, k, v, attn_mask=mask, scale=scale)
        out[lo:hi] = o.transpose(0, 1).to(q.dtype)
    return out


@jit
def _store_kv_token(
    kv_ptr,  # [num_blocks, layers_per_block, 2, block_size, num_kv_heads, head_dim]
    k,  # [BLOCK_H, BLOCK_D] tile of one token's K, any float dtype
    v,  # [BLOCK_H, BLOCK_D] tile of one token's V
    slot,  # scalar int64, >= 0
    layer_offset,  # layer * kv_cache.stride(1)
    stride_block,
    stride_kv,
    stride_token,
    stride_head,
    offs_h,  # [BLOCK_H] KV head indices
    offs_d,  # [BLOCK_D] head_dim indices
    mask,  # [BLOCK_H, BLOCK_D]
    BLOCK_SIZE: tl.constexpr,
):
    """Writes one token's K and V tiles to its slot, cast to the cache dtype."""
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    base = kv_ptr + block * stride_block + layer_offset + offset * stride_token
    ptrs = base + offs_h[:, None] * stride_head + offs_d[None, :]
    tl.store(ptrs, k.to(kv_ptr.dtype.element_ty), mask=mask)
    tl.store(ptrs + stride_kv, v.to(kv_ptr.dtype.element_ty), mask=mask)


@jit(do_not_specialize=["slot_mapping_ptr"])  # no alignment variants (kernels/rope.py)
def _write_kv_kernel(
    k_ptr,  # [num_tokens, num_kv_heads, head_dim]
    v_ptr,  # [num_tokens, num_kv_heads, head_dim]
    kv_ptr,  # [num_blocks, layers_per_block, 2, block_size, num_kv_heads, head_dim]
    slot_mapping_ptr,  # [num_tokens] int32/int64; -1 skips the token
    k_stride_token,
    k_stride_head,
    v_stride_token,
    v_stride_head,
    layer_offset,
    stride_block,
    stride_kv,
    stride_token,
    stride_head,
    num_kv_heads,
    head_dim,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program per token: copies its K and V (all KV heads) into the cache."""
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < num_kv_heads) & (offs_d[None, :] < head_dim)
    k_ptrs = k_ptr + token * k_stride_token + offs_h[:, None] * k_stride_head + offs_d[None, :]
    v_ptrs = v_ptr + token * v_stride_token + offs_h[:, None] * v_stride_head + offs_d[None, :]
    k = tl.load(k_ptrs, mask=mask, other=0.0)
    v = tl.load(v_ptrs, mask=mask, other=0.0)
    _store_kv_token(
        kv_ptr, k, v, slot, layer_offset, stride_block, stride_kv, stride_token, stride_head,
        offs_h, offs_d, mask, BLOCK_SIZE,
    )  # fmt: skip


def check_write_kv_args(
    k: torch.Tensor,
    v: torch.Tensor,
    kv_cache: torch.Tensor,
    layer: int,
    slot_mapping: torch.Tensor,
) -> torch.device:
    """Validates :func:`write_kv`'s arguments (also used by ``rope_and_write_kv``).

    Returns the common device; raises ValueError naming the first bad argument.
    """
    device = check_device("k", k)
    check_tensor("k", k, ndim=3, dtypes=FLOAT_DTYPES)
    check_tensor("v", v, ndim=3, dtypes=FLOAT_DTYPES, device=device)
    check_shape("v", v, tuple(k.shape))
    check_kv_cache(kv_cache, layer, device)
    if tuple(kv_cache.shape[4:]) != tuple(k.shape[1:]):
        raise ValueError(
            f"kv_cache (num_kv_heads, head_dim) {tuple(kv_cache.shape[4:])} does not match "
            f"k's {tuple(k.shape[1:])}"
        )
    check_tensor("slot_mapping", slot_mapping, ndim=1, dtypes=INDEX_DTYPES, device=device)
    check_shape("slot_mapping", slot_mapping, (k.shape[0],))
    return device


def write_kv(
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    kv_cache: torch.Tensor,  # [num_blocks, layers_per_block, 2, block_size, num_kv_heads, head_dim]
    layer: int,
    slot_mapping: torch.Tensor,  # [num_tokens] int32/int64; -1 skips the token (padding)
) -> None:
    """Triton twin of :func:`write_kv_ref`: writes each token's K and V into its slot, in place.

    ``k``/``v`` may be strided views (unit last stride) of any float dtype; values are cast to
    the cache dtype. Slots are not range-checked (that would need a device sync): a slot past
    ``num_blocks * block_size`` writes out of bounds. Raises ValueError naming a bad argument.
    """
    check_write_kv_args(k, v, kv_cache, layer, slot_mapping)
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    stride = kv_cache.stride()
    _write_kv_kernel[(num_tokens,)](
        k, v, kv_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        layer * stride[1], stride[0], stride[2], stride[3], stride[4],
        num_kv_heads, head_dim,
        BLOCK_SIZE=kv_cache.shape[3],
        BLOCK_H=next_pow2(num_kv_heads),
        BLOCK_D=next_pow2(head_dim),
        num_warps=4,
    )  # fmt: skip


def paged_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [num_blocks, layers_per_block, 2, block_size, num_kv_heads, head_dim]
    layer: int,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32: context length including this step's tokens
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32: prefix sums of query lengths
    scale: float,
    max_query_len: int | None = None,
) -> torch.Tensor:
    """Triton twin of :func:`paged_attention_ref`: decode kernel or prefill kernel.

    Calls :func:`paged_decode_attention` when every query length is 1 (``max_query_len == 1``
    and one query token per sequence), else :func:`paged_prefill_attention`. Give
    ``max_query_len`` (the longest query, in tokens) to avoid a device sync; None reads it
    from ``query_start_loc``. Returns [num_tokens, num_heads, head_dim] in q.dtype. Raises
    ValueError naming a bad argument, RuntimeError without Triton.
    """
    if max_query_len is None:
        check_tensor("query_start_loc", query_start_loc, ndim=1, dtypes=INDEX_DTYPES)
        lengths = query_start_loc[1:] - query_start_loc[:-1]
        max_query_len = int(lengths.max()) if lengths.numel() else 0
    if max_query_len == 1 and q.shape[0] == seq_lens.shape[0]:
        return paged_decode_attention(q, kv_cache, layer, block_tables, seq_lens, scale)
    return paged_prefill_attention(
        q, kv_cache, layer, block_tables, seq_lens, query_start_loc, max_query_len, scale
    )
