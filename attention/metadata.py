"""Per-step attention metadata, built once by the model runner and read by every layer."""

from __future__ import annotations

import dataclasses
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
    num_decodes: int = 0
    """In a mixed step (some queries longer than one token), how many leading sequences have a
    single query token: the backend runs their attention with the decode kernel and the rest
    with the prefill kernel (whose tiles of 128 queries would hold one real row for each of
    them). 0: one kernel for the whole step. The scheduler puts those sequences first."""
    prefill_query_start_loc: torch.Tensor | None = None
    """[num_seqs - num_decodes + 1] int32: ``query_start_loc`` of the sequences after the
    decodes, from 0 (None when ``num_decodes`` is 0)."""

    @classmethod
    def from_host(
        cls,
        slot_mapping: list[int],
        block_tables: list[list[int]],
        query_lens: list[int],
        seq_lens: list[int],
        device: torch.device,
    ) -> AttentionMetadata:
        """From host lists (one entry per token for ``slot_mapping``, per sequence for the
        rest): block tables padded with 0 to the longest (at least one column), query start
        locations as prefix sums of ``query_lens``. On CUDA the copies are pinned and
        asynchronous."""
        width = max(1, max(len(t) for t in block_tables))
        qsl = [0]
        for n in query_lens:
            qsl.append(qsl[-1] + n)
        nd = leading_decodes(query_lens)
        return cls(
            slot_mapping=host_tensor(slot_mapping, torch.int64, device),
            block_tables=host_tensor(
                [t + [0] * (width - len(t)) for t in block_tables], torch.int32, device
            ),
            seq_lens=host_tensor(seq_lens, torch.int32, device),
            query_start_loc=host_tensor(qsl, torch.int32, device),
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            num_decodes=nd,
            prefill_query_start_loc=prefill_starts(qsl, nd, device),
        )

    def with_decodes(self, num_decodes: int) -> AttentionMetadata:
        """This step's metadata with ``num_decodes`` leading single-token sequences split off
        (a stage rebuilding the metadata it received): ``prefill_query_start_loc`` is derived
        on the device. Raises ValueError when ``num_decodes`` leaves no longer query."""
        if num_decodes == 0:
            return self
        if not 0 < num_decodes < self.num_seqs:
            raise ValueError(f"num_decodes {num_decodes} of {self.num_seqs} sequences")
        starts = self.query_start_loc[num_decodes:] - num_decodes
        return dataclasses.replace(
            self, num_decodes=num_decodes, prefill_query_start_loc=starts.to(torch.int32)
        )

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1


def leading_decodes(query_lens: list[int]) -> int:
    """How many leading sequences of a mixed step have one query token (0 when the step is
    decode-only or starts with a longer query): :attr:`AttentionMetadata.num_decodes`."""
    nd = next((i for i, n in enumerate(query_lens) if n != 1), len(query_lens))
    return 0 if nd == len(query_lens) else nd


def prefill_starts(qsl: list[int], num_decodes: int, device: torch.device) -> torch.Tensor | None:
    """``query_start_loc`` (host prefix sums ``qsl``) of the sequences after ``num_decodes``
    single-token ones, from 0, on ``device``; None when ``num_decodes`` is 0."""
    if num_decodes == 0:
        return None
    return host_tensor([x - qsl[num_decodes] for x in qsl[num_decodes:]], torch.int32, device)


def host_tensor(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list on ``device``; on CUDA through pinned memory, without waiting."""
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t
