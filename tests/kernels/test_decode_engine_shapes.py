"""Paged decode attention at the shapes the engine benchmark runs (GPU only).

The engine's KV blocks hold every layer (layers_per_block > 1), its block tables are padded to
the longest sequence, and its sequences differ in length; the kernel bench uses none of these.
"""

from __future__ import annotations

import pytest
import torch

from kernels.paged_attention import paged_attention_ref, paged_decode_attention

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize(("batch", "max_ctx"), [(128, 4096), (256, 1024), (64, 4096), (8, 4096)])
def test_decode_matches_reference(batch: int, max_ctx: int) -> None:
    torch.manual_seed(batch + max_ctx)
    dev, heads, kv_heads, d, bs, layers = "cuda", 32, 8, 128, 16, 4
    seq_lens = torch.randint(max_ctx // 2, max_ctx + 1, (batch,), dtype=torch.int32)
    seq_lens[0] = max_ctx
    width = max_ctx // bs
    num_blocks = batch * width
    kv = torch.randn(num_blocks, layers, 2, bs, kv_heads, d, dtype=torch.bfloat16, device=dev)
    tables = torch.randperm(num_blocks, device=dev).view(batch, width).int()
    q = torch.randn(batch, heads, d, dtype=torch.bfloat16, device=dev)
    qsl = torch.arange(batch + 1, dtype=torch.int32, device=dev)
    lens = seq_lens.to(dev)
    out = paged_decode_attention(q, kv, layers - 1, tables, lens, d**-0.5)
    ref = paged_attention_ref(q.float(), kv.float(), layers - 1, tables, lens, qsl, d**-0.5)
    assert not out.isnan().any()
    err = (out.float() - ref).norm() / ref.norm()
    assert err <= 1e-2, f"relative error {err:.3e}"
