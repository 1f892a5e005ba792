"""Attention over a paged KV cache, and the KV-cache write through a slot mapping.

KV-cache layout (DESIGN.md §5, KunServe's): one tensor per worker,

    kv_cache: [num_blocks, layers_per_block, 2, block_size, num_kv_heads, head_dim]

A block holds every layer the worker computes, so that after a drop a free block can be re-read
as several blocks of fewer layers with no copy. ``layer`` below is the index inside a block
(0 <= layer < layers_per_block), and ``[:, :, 0]`` is K, ``[:, :, 1]`` is V. A token's slot is
``block_id * block_size + offset``; block tables map a sequence's logical block i to a block id.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
        pos_q = torch.arange(seq_len - q_len, seq_len)[:, None]
        mask = torch.arange(seq_len)[None, :] <= pos_q  # [q_len, S]
        o = F.scaled_dot_product_attention(qi, k, v, attn_mask=mask, scale=scale)
        out[lo:hi] = o.transpose(0, 1).to(q.dtype)
    return out
