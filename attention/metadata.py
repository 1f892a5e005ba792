"""Per-step attention metadata, built once by the model runner and read by every layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """Where this step's tokens go in the paged KV cache and what each sequence attends to."""

    slot_mapping: torch.Tensor  # [num_tokens] int64: block_id * block_size + offset
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor  # [num_seqs] int32: context length including this step's tokens
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32: prefix sums of query lengths
    max_query_len: int
    max_seq_len: int
    decode_num_splits: int | None = None
    """Flash-decoding context splits for a decode-only step (1..64); None lets the kernel
    choose from the batch size and the block-table width. A captured CUDA graph fixes it at
    capture (workers/cuda_graphs.py), so a replay launches the same grid it recorded."""

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1
