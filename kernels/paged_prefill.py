"""Prefill attention over the paged KV cache: varlen, causal FlashAttention-2 in Triton.

Covers prefill, chunked prefill over a cached prefix, and mixed batches (a decode is a query
of length 1). One program takes ``BLOCK_M`` consecutive queries of one sequence and one query
head, and runs the online-softmax loop of FlashAttention-2 (Dao 2023, Algorithm 1) over the
keys its queries may see, reading K/V through the block table. The key range splits in two:
keys before the tile's first query position are visible to every row and need no causal mask;
only the last few key tiles, on the diagonal, are masked. Programs of the query heads that
share a KV head are adjacent in the grid, so their K/V reads hit L2. The layout of
``kv_cache`` is described in :mod:`kernels.paged_attention`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from kernels._triton import INDEX_DTYPES, check_tensor, jit, next_pow2, tl, triton
from kernels.paged_decode import METADATA_ARGS, _attend_key_range, check_out, check_paged_args


# metadata of a mixed step is sliced past its decodes: no alignment variants (paged_decode.py)
@jit(do_not_specialize=[*METADATA_ARGS, "query_start_loc_ptr"])
def _paged_prefill_kernel(
    q_ptr,  # [num_tokens, num_heads, head_dim]
    kv_ptr,  # [num_blocks, layers_per_block, 2, block_size, num_kv_heads, head_dim]
    block_tables_ptr,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens_ptr,  # [num_seqs] int32
    query_start_loc_ptr,  # [num_seqs + 1] int32/int64
    out_ptr,  # [num_tokens, num_heads, head_dim], contiguous
    q_stride_token,
    q_stride_head,
    block_tables_stride,
    layer_offset,  # layer * kv_cache.stride(1)
    stride_block,
    stride_kv,
    stride_token,
    qk_scale,  # softmax scale * log2(e)
    num_heads,
    head_dim,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Grid (num_heads, cdiv(max_query_len, BLOCK_M), num_seqs); later query tiles first."""
    head = tl.program_id(0)
    q_tile = tl.num_programs(1) - 1 - tl.program_id(1)
    seq = tl.program_id(2).to(tl.int64)
    q_start = tl.load(query_start_loc_ptr + seq).to(tl.int64)
    q_len = (tl.load(query_start_loc_ptr + seq + 1) - q_start).to(tl.int32)
    if q_tile * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    prefix = seq_len - q_len  # cached tokens before this step's queries

    rows = q_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = rows < q_len
    mask_d = offs_d < head_dim
    q_ptrs = q_ptr + (q_start + rows[:, None]) * q_stride_token + head * q_stride_head
    q = tl.load(q_ptrs + offs_d[None, :], mask=mask_m[:, None] & mask_d[None, :], other=0.0)

    k_base = kv_ptr + layer_offset + (head // GROUP) * head_dim + offs_d[None, :]
    block_table = block_tables_ptr + seq * block_tables_stride
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    unmasked_end = (prefix + q_tile * BLOCK_M) // BLOCK_N * BLOCK_N
    kv_end = tl.minimum(seq_len, prefix + (q_tile + 1) * BLOCK_M)
    acc, m_i, l_i = _attend_key_range(
        acc, m_i, l_i, q, prefix + rows, k_base, block_table, 0, unmasked_end, mask_d,
        stride_block, stride_kv, stride_token, qk_scale, BLOCK_N, BLOCK_SIZE, False,
        DOT_PRECISION,
    )  # fmt: skip
    acc, m_i, l_i = _attend_key_range(
        acc, m_i, l_i, q, prefix + rows, k_base, block_table, unmasked_end, kv_end, mask_d,
        stride_block, stride_kv, stride_token, qk_scale, BLOCK_N, BLOCK_SIZE, True,
        DOT_PRECISION,
    )  # fmt: skip
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    out_ptrs = out_ptr + ((q_start + rows[:, None]) * num_heads + head) * head_dim + offs_d[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


def paged_prefill_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [num_blocks, layers_per_block, 2, block_size, num_kv_heads, head_dim]
    layer: int,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32: context length including this step's tokens
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32/int64: prefix sums of query lengths
    max_query_len: int,
    scale: float,
    out: torch.Tensor | None = None,
    *,
    tiles: PrefillTiles | None = None,
) -> torch.Tensor:
    """Causal attention of each sequence's new tokens over its whole paged context.

    Same semantics as :func:`~kernels.paged_attention.paged_attention_ref`: sequence i's
    queries ``q[query_start_loc[i]:query_start_loc[i+1]]`` sit at its last ``q_len``
    positions, whose K/V must already be in the cache; covers prefill, chunked prefill over a
    cached prefix and mixed batches. ``max_query_len`` (tokens) must be >= every query length:
    it sizes the grid without a device sync, and queries past it are left unwritten. ``q`` and
    ``kv_cache`` share a dtype (fp16, bf16, fp32); accumulation is fp32. Returns
    [num_tokens, num_heads, head_dim] in q.dtype: a new tensor, or ``out`` (contiguous, that
    shape and dtype) when given. ``tiles`` overrides :func:`prefill_tiles` (a benchmark's
    sweep, ``python -m kernels.bench --only chunks``). Raises ValueError naming a bad
    argument, RuntimeError without Triton.
    """
    device = check_paged_args(q, kv_cache, layer, block_tables, seq_lens, scale)
    num_seqs = seq_lens.shape[0]
    check_tensor("query_start_loc", query_start_loc, ndim=1, dtypes=INDEX_DTYPES, device=device)
    if query_start_loc.shape[0] != num_seqs + 1:
        raise ValueError(
            f"query_start_loc must have num_seqs + 1 = {num_seqs + 1} entries, "
            f"got {query_start_loc.shape[0]}"
        )
    if not isinstance(max_query_len, int) or max_query_len < 0:
        raise ValueError(f"max_query_len must be a non-negative int, got {max_query_len!r}")
    out = check_out(out, tuple(q.shape), q.dtype, device)
    if num_seqs == 0 or max_query_len == 0 or q.shape[0] == 0:
        return out
    _launch_prefill(q, kv_cache, layer, block_tables, seq_lens, query_start_loc, max_query_len,
                    scale, out, tiles or prefill_tiles(q.shape[2]))  # fmt: skip
    return out


def causal_pairs(num_tokens: int, start: int) -> int:
    """Query-key pairs the causal attention of a chunk of ``num_tokens`` queries at positions
    ``start ..`` computes, per head and layer: each query sees the keys up to its own
    position, ``num_tokens * start + num_tokens * (num_tokens + 1) / 2``."""
    return num_tokens * start + num_tokens * (num_tokens + 1) // 2


class PrefillTiles(NamedTuple):
    """One launch configuration of the prefill kernel."""

    block_m: int  # queries per program
    block_n: int  # keys per inner step
    num_warps: int
    num_stages: int


def prefill_tiles(head_dim: int) -> PrefillTiles:
    """The default tiles for ``head_dim``: 128 queries x 128 keys up to head_dim 128, else
    64 x 32; 8 warps, 2 stages.

    128 x 128 was within 11% of the fastest setting at every shape of a sweep on one H200
    (bf16, head_dim 128, GQA 32/8; docs/benchmarks.md, session 21): 1,024-token chunks at
    1k-7k of context and whole prompts of 512-8,192 tokens. It took 0.80-0.93x the time of
    128 x 64, and 0.72-0.95x SDPA flash's."""
    if max(next_pow2(head_dim), 16) <= 128:
        return PrefillTiles(128, 128, 8, 2)
    return PrefillTiles(64, 32, 8, 2)


def _launch_prefill(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    layer: int,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start_loc: torch.Tensor,
    max_query_len: int,
    scale: float,
    out: torch.Tensor,
    tiles: PrefillTiles,
) -> None:
    num_heads, head_dim = q.shape[1], q.shape[2]
    block_d = max(next_pow2(head_dim), 16)
    grid = (num_heads, triton.cdiv(max_query_len, tiles.block_m), seq_lens.shape[0])
    stride = kv_cache.stride()
    _paged_prefill_kernel[grid](
        q, kv_cache, block_tables, seq_lens, query_start_loc, out,
        q.stride(0), q.stride(1), block_tables.stride(0),
        layer * stride[1], stride[0], stride[2], stride[3],
        scale * math.log2(math.e), num_heads, head_dim,
        GROUP=num_heads // kv_cache.shape[4],
        BLOCK_M=tiles.block_m,
        BLOCK_N=tiles.block_n,
        BLOCK_D=block_d,
        BLOCK_SIZE=kv_cache.shape[3],
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
    )  # fmt: skip
