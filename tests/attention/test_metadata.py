"""Attention metadata built from a step's host lists: the mixed step's decode split."""

from __future__ import annotations

import pytest
import torch

from attention.metadata import AttentionMetadata, leading_decodes

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("query_lens", "expected"),
    [([1, 1, 5, 1], 2), ([1, 1, 1], 0), ([4, 1, 1], 0), ([1, 3], 1), ([7], 0)],
)
def test_leading_decodes_are_counted_only_in_a_mixed_step(
    query_lens: list[int], expected: int
) -> None:
    assert leading_decodes(query_lens) == expected


def test_from_host_splits_a_mixed_step_and_a_receiver_rebuilds_the_split() -> None:
    query_lens, seq_lens = [1, 1, 5, 1, 3], [9, 4, 5, 20, 30]
    tables = [[0, 1, 2], [3], [4, 5], [6] * 5, [7] * 8]
    slots = list(range(sum(query_lens)))
    meta = AttentionMetadata.from_host(slots, tables, query_lens, seq_lens, CPU)
    assert meta.num_decodes == 2
    assert meta.query_start_loc.tolist() == [0, 1, 2, 7, 8, 11]
    assert meta.prefill_query_start_loc.tolist() == [0, 5, 6, 9]
    plain = AttentionMetadata(
        meta.slot_mapping, meta.block_tables, meta.seq_lens, meta.query_start_loc, 5, 30
    )
    rebuilt = plain.with_decodes(2)
    assert rebuilt.num_decodes == 2 and plain.num_decodes == 0
    assert rebuilt.prefill_query_start_loc.dtype == torch.int32
    assert rebuilt.prefill_query_start_loc.tolist() == [0, 5, 6, 9]
    assert plain.with_decodes(0) is plain
    with pytest.raises(ValueError, match="num_decodes 5 of 5 sequences"):
        plain.with_decodes(5)
    decode_only = AttentionMetadata.from_host([0, 1], [[0], [1]], [1, 1], [3, 4], CPU)
    assert decode_only.num_decodes == 0 and decode_only.prefill_query_start_loc is None
