"""Decode attention over the paged KV cache: GQA-aware flash-decoding in Triton.

One program takes one (sequence, KV head, context split): it loads the query rows of every
query head that shares the KV head (padded to at least 16 rows for ``tl.dot``), so each K/V
tile is read from memory once for the whole group, and runs the online-softmax loop of
FlashAttention-2 (Dao 2023, Algorithm 1) over its split of the context. With more than one
split, each writes an fp32 partial output and its log-sum-exp, and a second kernel merges the
splits (Flash-Decoding, Dao, Haziza, Massa & Sizov 2023). Splits are sized per sequence, so
no host sync is needed to launch: ``num_splits`` only sets how many programs each (sequence,
KV head) gets. The layout of ``kv_cache`` is described in :mod:`kernels.paged_attention`.
"""

from __future__ import annotations

import math

import torch

from kernels._triton import (
    FLOAT_DTYPES,
    check_device,
    check_kv_cache,
    check_tensor,
    interpreting,
    jit,
    next_pow2,
    num_sms,
    tl,
)

MAX_SPLITS = 64
"""Upper bound on ``num_splits`` (the merge kernel holds all of a head's splits at once)."""
MIN_TOKENS_PER_SPLIT = 128
"""The automatic choice gives each split at least this many context tokens."""


@jit
def _kv_tile_offsets(
    block_table_ptr,  # [max_blocks_per_seq] int32: this sequence's row of the block tables
    tokens,  # [BLOCK_N] context positions of the tile
    mask,  # [BLOCK_N] which positions are real
    stride_block,
    stride_token,
    BLOCK_SIZE: tl.constexpr,
):
    """Element offsets of the tile's tokens in the cache (relative to block 0, this layer, K)."""
    block_ids = tl.load(block_table_ptr + tokens // BLOCK_SIZE, mask=mask, other=0)
    return block_ids.to(tl.int64) * stride_block + (tokens % BLOCK_SIZE) * stride_token


@jit
def _attend_key_range(
    acc,  # [BLOCK_M, BLOCK_D] float32 running output
    m_i,  # [BLOCK_M] float32 running max, base 2
    l_i,  # [BLOCK_M] float32 running sum
    q,  # [BLOCK_M, BLOCK_D] query tile
    q_pos,  # [BLOCK_M] int32 query positions in the sequence
    k_base,  # [1, BLOCK_D] pointers to K of block 0 at this layer and KV head
    block_table,  # pointer to this sequence's block-table row
    lo,
    hi,
    mask_d,  # [BLOCK_D]
    stride_block,
    stride_kv,
    stride_token,
    qk_scale,
    BLOCK_N: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """FlashAttention-2's online-softmax update of (acc, m_i, l_i) over keys [lo, hi).

    Shared by both kernels: rows are one KV head's query heads (decode) or consecutive queries
    of one head (prefill). K/V tiles are gathered through the block table. CAUSAL masks keys
    after each row's ``q_pos``; without it every key in [lo, hi) must be visible to every
    row and hi - lo must be a multiple of BLOCK_N (tokens past hi would score 0, not -inf).
    """
    for tile_start in range(lo, hi, BLOCK_N):
        tokens = tile_start + tl.arange(0, BLOCK_N)
        mask_n = tokens < hi
        offsets = _kv_tile_offsets(
            block_table, tokens, mask_n, stride_block, stride_token, BLOCK_SIZE
        )
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_base + offsets[:, None], mask=kv_mask, other=0.0)
        v = tl.load(k_base + stride_kv + offsets[:, None], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if CAUSAL:
            s = tl.where(tokens[None, :] <= q_pos[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, m_i, l_i


# Triton compiles a variant per value class of each argument not listed here: integers by
# value (== 1, divisible by 16), pointers by 16-byte alignment. An eager step's block-table
# width and split count vary from step to step, and so does the alignment of the metadata a
# mixed step slices after its decodes (``seq_lens[nd:]``: 4·nd bytes in); each new variant
# cost a compile of 0.15-0.3 s of token gap in the middle of serving (issue #5,
# docs/benchmarks.md). Only constexprs make variants now, and :func:`warm_up` compiles those.
METADATA_ARGS = ["block_tables_ptr", "seq_lens_ptr", "block_tables_stride"]


@jit(do_not_specialize=[*METADATA_ARGS, "num_splits"])
def _paged_decode_kernel(
    q_ptr,  # [num_seqs, num_heads, head_dim]
    kv_ptr,  # [num_blocks, layers_per_block, 2, block_size, num_kv_heads, head_dim]
    block_tables_ptr,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens_ptr,  # [num_seqs] int32
    out_ptr,  # [num_seqs, num_heads, head_dim]; if SPLIT, fp32 [num_seqs, num_heads, num_splits, head_dim]
    lse_ptr,  # [num_seqs, num_heads, num_splits] float32; written only if SPLIT
    q_stride_seq,
    q_stride_head,
    block_tables_stride,
    layer_offset,  # layer * kv_cache.stride(1)
    stride_block,
    stride_kv,
    stride_token,
    qk_scale,  # softmax scale * log2(e): the kernel works in base 2
    num_heads,
    head_dim,
    num_splits,
    GROUP: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Grid (num_seqs, num_kv_heads, num_splits); SPLIT is num_splits > 1."""
    seq = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    tiles_per_split = tl.cdiv(tl.cdiv(seq_len, BLOCK_N), num_splits)
    start = split * tiles_per_split * BLOCK_N
    end = tl.minimum(start + tiles_per_split * BLOCK_N, seq_len)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + offs_h
    mask_h = offs_h < GROUP
    mask_d = offs_d < head_dim
    q_ptrs = q_ptr + seq * q_stride_seq + heads[:, None] * q_stride_head + offs_d[None, :]
    q = tl.load(q_ptrs, mask=mask_h[:, None] & mask_d[None, :], other=0.0)

    k_base = kv_ptr + layer_offset + kv_head * head_dim + offs_d[None, :]
    block_table = block_tables_ptr + seq * block_tables_stride
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    # Split bounds are multiples of BLOCK_N except the sequence's end, so a causal mask at
    # position seq_len - 1 masks exactly the padding of the last tile.
    q_pos = tl.full([BLOCK_H], 0, tl.int32) + seq_len - 1
    acc, m_i, l_i = _attend_key_range(
        acc, m_i, l_i, q, q_pos, k_base, block_table, start, end, mask_d,
        stride_block, stride_kv, stride_token, qk_scale, BLOCK_N, BLOCK_SIZE, True,
        DOT_PRECISION,
    )  # fmt: skip

    # An empty split (past the end of a short sequence) leaves l_i == 0: it writes zeros and
    # a log-sum-exp of -inf, which gives it weight 0 in the merge.
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    out_mask = mask_h[:, None] & mask_d[None, :]
    if not SPLIT:
        out_ptrs = out_ptr + (seq * num_heads + heads[:, None]) * head_dim + offs_d[None, :]
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        row = (seq * num_heads + heads) * num_splits + split
        tl.store(out_ptr + row[:, None] * head_dim + offs_d[None, :], out, mask=out_mask)
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + row, lse, mask=mask_h)


@jit(do_not_specialize=["num_splits"])  # BLOCK_S (its power-of-2 bound) makes the variants
def _merge_splits_kernel(
    partial_ptr,  # [num_seqs * num_heads, num_splits, head_dim] float32
    lse_ptr,  # [num_seqs * num_heads, num_splits] float32, base-2 log-sum-exp
    out_ptr,  # [num_seqs * num_heads, head_dim]
    head_dim,
    num_splits,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Grid (num_seqs * num_heads,): softmax-weighted sum of the splits' partial outputs."""
    row = tl.program_id(0).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < num_splits
    lse = tl.load(lse_ptr + row * num_splits + offs_s, mask=mask_s, other=float("-inf"))
    lse_max = tl.max(lse, axis=0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    weights = tl.exp2(lse - lse_max)
    total = tl.sum(weights, axis=0)
    mask = mask_s[:, None] & (offs_d[None, :] < head_dim)
    partial_ptrs = partial_ptr + (row * num_splits + offs_s[:, None]) * head_dim + offs_d[None, :]
    partial = tl.load(partial_ptrs, mask=mask, other=0.0)
    out = tl.sum(partial * weights[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(
        out_ptr + row * head_dim + offs_d, out.to(out_ptr.dtype.element_ty), mask=offs_d < head_dim
    )


def choose_num_splits(
    num_seqs: int, num_kv_heads: int, max_context: int, sm_count: int = 132
) -> int:
    """Context splits per (sequence, KV head) for flash-decoding.

    Enough splits that the grid covers the GPU's multiprocessors about twice, but no split
    shorter than ``MIN_TOKENS_PER_SPLIT`` tokens of ``max_context`` (a context-length bound in
    tokens) and at most ``MAX_SPLITS``. Large batches get 1 (no merge kernel).
    """
    programs = max(num_seqs * num_kv_heads, 1)
    want = -(-2 * sm_count // programs)
    by_length = max(max_context // MIN_TOKENS_PER_SPLIT, 1)
    return max(1, min(want, by_length, MAX_SPLITS))


def check_paged_args(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    layer: int,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.device:
    """Validates the arguments common to the paged-attention wrappers; returns the device.

    Raises ValueError naming the first bad argument (see :func:`paged_decode_attention`).
    """
    device = check_device("q", q)
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES)
    check_kv_cache(kv_cache, layer, device)
    if kv_cache.dtype != q.dtype:
        raise ValueError(f"kv_cache dtype {kv_cache.dtype} must match q's {q.dtype}")
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = kv_cache.shape[4]
    if kv_cache.shape[5] != head_dim:
        raise ValueError(f"kv_cache head_dim {kv_cache.shape[5]} must match q's {head_dim}")
    if num_heads % num_kv_heads:
        raise ValueError(f"q: num_heads {num_heads} is not a multiple of {num_kv_heads} KV heads")
    check_tensor("block_tables", block_tables, ndim=2, dtypes=(torch.int32,), device=device)
    check_tensor("seq_lens", seq_lens, ndim=1, dtypes=(torch.int32,), device=device)
    if seq_lens.shape[0] != block_tables.shape[0]:
        raise ValueError(
            f"seq_lens has {seq_lens.shape[0]} entries but block_tables {block_tables.shape[0]} rows"
        )
    if not (isinstance(scale, float | int) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite float, got {scale!r}")
    return device


def check_out(
    out: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """``out`` checked to be a contiguous tensor of ``shape`` and ``dtype`` on ``device`` (the
    kernels write it as such), or a new one when None. Raises ValueError otherwise."""
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(out.shape) != shape or out.dtype != dtype or out.device != device:
        raise ValueError(
            f"out must be {list(shape)} {dtype} on {device}, got {list(out.shape)} "
            f"{out.dtype} on {out.device}"
        )
    if not out.is_contiguous():
        raise ValueError("out must be contiguous")
    return out


def paged_decode_attention(
    q: torch.Tensor,  # [num_seqs, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [num_blocks, layers_per_block, 2, block_size, num_kv_heads, head_dim]
    layer: int,
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32, context length including this step's token
    scale: float,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention: one new query token per sequence over its paged context.

    Same result as :func:`~kernels.paged_attention.paged_attention_ref` with every query
    length 1 (query i is sequence i's, at position ``seq_lens[i] - 1``); GQA maps query head
    h to KV head ``h // (num_heads // num_kv_heads)``. ``q`` and ``kv_cache`` share a dtype
    (fp16, bf16, fp32); accumulation is fp32. ``num_splits`` (1..64) splits each context for
    flash-decoding; None picks it from the batch size and the context bound
    ``block_tables.shape[1] * block_size`` with :func:`choose_num_splits`, with no device sync.
    A sequence of length 0 gets zeros. Returns [num_seqs, num_heads, head_dim] in q.dtype: a
    new tensor, or ``out`` (contiguous, that shape and dtype) when given. Raises ValueError
    naming a bad argument, RuntimeError without Triton.
    """
    device = check_paged_args(q, kv_cache, layer, block_tables, seq_lens, scale)
    num_seqs, num_heads, head_dim = q.shape
    if seq_lens.shape[0] != num_seqs:
        raise ValueError(
            f"seq_lens must have {num_seqs} entries (one per query), got {seq_lens.shape[0]}"
        )
    num_kv_heads, block_size = kv_cache.shape[4], kv_cache.shape[3]
    if num_splits is None:
        max_context = block_tables.shape[1] * block_size
        num_splits = choose_num_splits(num_seqs, num_kv_heads, max_context, num_sms(device))
    if not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be in 1..{MAX_SPLITS}, got {num_splits}")
    out = check_out(out, (num_seqs, num_heads, head_dim), q.dtype, device)
    if num_seqs == 0:
        return out
    return _launch_decode(q, kv_cache, layer, block_tables, seq_lens, scale, num_splits, out)


def _launch_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    layer: int,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    num_splits: int,
    out: torch.Tensor,
) -> torch.Tensor:
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads, block_size = kv_cache.shape[4], kv_cache.shape[3]
    group = num_heads // num_kv_heads
    block_d = max(next_pow2(head_dim), 16)
    if num_splits == 1:
        partial, lse = out, out  # the kernel writes the final output directly
    else:
        partial = torch.empty(
            (num_seqs, num_heads, num_splits, head_dim), dtype=torch.float32, device=q.device
        )
        lse = torch.empty((num_seqs, num_heads, num_splits), dtype=torch.float32, device=q.device)
    stride = kv_cache.stride()
    _paged_decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, kv_cache, block_tables, seq_lens, partial, lse,
        q.stride(0), q.stride(1), block_tables.stride(0),
        layer * stride[1], stride[0], stride[2], stride[3],
        scale * math.log2(math.e), num_heads, head_dim, num_splits,
        GROUP=group,
        BLOCK_H=max(next_pow2(group), 16),
        BLOCK_N=64 if block_d <= 128 else 32,
        BLOCK_D=block_d,
        BLOCK_SIZE=block_size,
        SPLIT=num_splits > 1,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=4,
        num_stages=3,
    )  # fmt: skip
    if num_splits > 1:
        _merge_splits_kernel[(num_seqs * num_heads,)](
            partial, lse, out, head_dim, num_splits,
            BLOCK_S=next_pow2(num_splits), BLOCK_D=block_d, num_warps=4,
        )  # fmt: skip
    return out


def warm_up(
    device: torch.device,
    dtype: torch.dtype,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
) -> int:
    """Compiles every variant of the decode and merge kernels a server can launch for this
    model shape (one split and each power-of-2 split bound up to ``MAX_SPLITS``), on a
    one-block cache, so none compiles in the middle of serving. Returns the launches made.
    Call once at start-up, before serving (a no-op under the Triton interpreter, which
    compiles nothing)."""
    if interpreting():
        return 0
    kv = torch.zeros((1, 1, 2, block_size, num_kv_heads, head_dim), dtype=dtype, device=device)
    q = torch.zeros((1, num_heads, head_dim), dtype=dtype, device=device)
    tables = torch.zeros((1, 1), dtype=torch.int32, device=device)
    lens = torch.ones(1, dtype=torch.int32, device=device)
    splits = [1] + [1 << i for i in range(1, MAX_SPLITS.bit_length())]
    for n in splits:
        paged_decode_attention(q, kv, 0, tables, lens, 1.0, num_splits=n)
    return len(splits)
