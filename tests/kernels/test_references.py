"""The torch reference kernels against independent, naive implementations (CPU, float64 math)."""

from __future__ import annotations

import math

import pytest
import torch

from kernels.norm import rms_norm_ref
from kernels.paged_attention import paged_attention_ref, write_kv_ref
from kernels.rope import RopeScaling, apply_rope_ref, rope_cos_sin_cache, rope_inv_freq

BLOCK_SIZE = 4
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 4, 2, 8


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def naive_causal_attention(
    q: torch.Tensor,  # [q_len, num_heads, head_dim]: the last q_len positions of the sequence
    k: torch.Tensor,  # [seq_len, num_kv_heads, head_dim]
    v: torch.Tensor,  # [seq_len, num_kv_heads, head_dim]
    scale: float,
) -> torch.Tensor:
    """Token-by-token softmax attention in float64; query head h reads KV head h // group."""
    q_len, seq_len = q.shape[0], k.shape[0]
    group = q.shape[1] // k.shape[1]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for t in range(q_len):
        pos = seq_len - q_len + t
        for h in range(q.shape[1]):
            keys, values = k[: pos + 1, h // group].double(), v[: pos + 1, h // group].double()
            weights = torch.softmax(keys @ q[t, h].double() * scale, dim=0)
            out[t, h] = weights @ values
    return out


def make_paged_batch(seq_lens: list[int], q_lens: list[int], layer: int, num_blocks: int = 16):
    """Random contiguous K/V per sequence, scattered into a garbage-filled paged cache through
    random block tables. Returns (q, kv_cache, block_tables, seq_lens, query_start_loc, per-seq
    contiguous (q, k, v))."""
    g = gen(1)
    cache = torch.randn(num_blocks, 2, 2, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, generator=g) * 50
    ids = torch.randperm(num_blocks, generator=g).tolist()
    width = max(-(-s // BLOCK_SIZE) for s in seq_lens) + 1  # one padding column of garbage
    tables, per_seq, qs = [], [], []
    for seq_len, q_len in zip(seq_lens, q_lens, strict=True):
        table = [ids.pop() for _ in range(-(-seq_len // BLOCK_SIZE))]
        tables.append(table + [ids[0]] * (width - len(table)))
        k = torch.randn(seq_len, NUM_KV_HEADS, HEAD_DIM, generator=g)
        v = torch.randn(seq_len, NUM_KV_HEADS, HEAD_DIM, generator=g)
        for pos in range(seq_len):
            block, offset = table[pos // BLOCK_SIZE], pos % BLOCK_SIZE
            cache[block, layer, 0, offset] = k[pos]
            cache[block, layer, 1, offset] = v[pos]
        q = torch.randn(q_len, NUM_HEADS, HEAD_DIM, generator=g)
        qs.append(q)
        per_seq.append((q, k, v))
    qsl = [0]
    for q_len in q_lens:
        qsl.append(qsl[-1] + q_len)
    return (
        torch.cat(qs),
        cache,
        torch.tensor(tables, dtype=torch.int32),
        torch.tensor(seq_lens, dtype=torch.int32),
        torch.tensor(qsl, dtype=torch.int32),
        per_seq,
    )


@pytest.mark.parametrize(
    ("seq_lens", "q_lens"),
    [
        ([7], [7]),  # prefill
        ([9, 13, 1], [1, 1, 1]),  # decode
        ([11], [5]),  # chunked prefill over a cached 6-token prefix
        ([9, 11, 7, 4], [1, 5, 7, 0]),  # mixed batch, one sequence with no new tokens
    ],
)
@pytest.mark.parametrize("layer", [0, 1])
def test_paged_attention_matches_dense_causal_attention(
    seq_lens: list[int], q_lens: list[int], layer: int
) -> None:
    q, cache, tables, lens, qsl, per_seq = make_paged_batch(seq_lens, q_lens, layer)
    scale = HEAD_DIM**-0.5
    out = paged_attention_ref(q, cache, layer, tables, lens, qsl, scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    expected = torch.cat([naive_causal_attention(*s, scale) for s in per_seq])
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5)


def test_paged_attention_keeps_q_dtype() -> None:
    q, cache, tables, lens, qsl, per_seq = make_paged_batch([6], [2], layer=0)
    out = paged_attention_ref(q.bfloat16(), cache.bfloat16(), 0, tables, lens, qsl, 0.5)
    expected = naive_causal_attention(
        per_seq[0][0].bfloat16(), per_seq[0][1].bfloat16(), per_seq[0][2].bfloat16(), 0.5
    )
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=2e-2)


def test_write_kv_skips_slot_minus_one() -> None:
    g = gen(2)
    k = torch.randn(4, NUM_KV_HEADS, HEAD_DIM, generator=g)
    v = torch.randn(4, NUM_KV_HEADS, HEAD_DIM, generator=g)
    cache = torch.zeros(4, 2, 2, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    write_kv_ref(k, v, cache, 1, torch.tensor([5, -1, 0, 15]))
    expected = torch.zeros_like(cache)
    for token, (block, offset) in ((0, (1, 1)), (2, (0, 0)), (3, (3, 3))):
        expected[block, 1, 0, offset] = k[token]
        expected[block, 1, 1, offset] = v[token]
    assert torch.equal(cache, expected)


def test_write_kv_casts_to_the_cache_dtype() -> None:
    k = torch.full((1, NUM_KV_HEADS, HEAD_DIM), 1.0 + 2**-10)
    v = torch.full((1, NUM_KV_HEADS, HEAD_DIM), -3.0)
    cache = torch.zeros(2, 1, 2, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, dtype=torch.bfloat16)
    write_kv_ref(k, v, cache, 0, torch.tensor([6]))
    written = torch.zeros_like(cache, dtype=torch.bool)
    written[1, 0, :, 2] = True
    assert (cache[1, 0, 0, 2] == 1.0).all()  # 1 + 2^-10 rounds to 1 in bfloat16
    assert (cache[1, 0, 1, 2] == -3.0).all()
    assert (cache[~written] == 0).all()


def naive_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x = x.double()
    rms = torch.sqrt((x * x).sum(-1, keepdim=True) / x.shape[-1] + eps)
    return x / rms * weight.double()


def test_rms_norm_with_residual() -> None:
    g = gen(3)
    x, residual = torch.randn(3, 16, generator=g), torch.randn(3, 16, generator=g)
    weight = torch.randn(16, generator=g)
    normed, new_residual = rms_norm_ref(x, weight, 1e-5, residual)
    assert torch.equal(new_residual, x + residual)
    torch.testing.assert_close(normed.double(), naive_rms_norm(x + residual, weight, 1e-5))


def test_rms_norm_without_residual_returns_x_as_the_residual() -> None:
    g = gen(4)
    x, weight = torch.randn(2, 16, generator=g) * 1e-3, torch.randn(16, generator=g)
    normed, residual = rms_norm_ref(x, weight, 1e-2)
    assert torch.equal(residual, x)
    torch.testing.assert_close(normed.double(), naive_rms_norm(x, weight, 1e-2))


def test_rms_norm_of_bfloat16_computes_in_float32() -> None:
    x = torch.tensor([[300.0, -400.0]], dtype=torch.bfloat16)
    normed, _ = rms_norm_ref(x, torch.ones(2, dtype=torch.bfloat16), 0.0)
    assert normed.dtype == torch.bfloat16
    # rms = sqrt((300^2 + 400^2) / 2) = 353.55...; 300 / rms = 0.8485, -400 / rms = -1.1314
    assert normed.float().tolist() == [[0.84765625, -1.1328125]]


def complex_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate-half RoPE as complex multiplication: (x_i + j x_{i+d/2}) * e^{j pos theta^(-2i/d)}."""
    d = x.shape[-1]
    half = d // 2
    inv_freq = theta ** (-torch.arange(half, dtype=torch.float64) * 2 / d)
    angle = positions.double()[:, None] * inv_freq[None, :]  # [tokens, half]
    z = torch.complex(x[..., :half].double(), x[..., half:].double())
    z = z * torch.polar(torch.ones_like(angle), angle)[:, None, :]
    return torch.cat([z.real, z.imag], dim=-1)


def test_apply_rope_matches_complex_rotation() -> None:
    g = gen(5)
    positions = torch.tensor([0, 1, 7, 100, 511])
    q = torch.randn(5, NUM_HEADS, HEAD_DIM, generator=g)
    k = torch.randn(5, NUM_KV_HEADS, HEAD_DIM, generator=g)
    cache = rope_cos_sin_cache(HEAD_DIM, 512, 10000.0)
    q_rot, k_rot = apply_rope_ref(q, k, positions, cache)
    torch.testing.assert_close(
        q_rot.double(), complex_rope(q, positions, 10000.0), atol=1e-4, rtol=0
    )
    torch.testing.assert_close(
        k_rot.double(), complex_rope(k, positions, 10000.0), atol=1e-4, rtol=0
    )
    assert torch.equal(q_rot[0], q[0])  # position 0 is the identity


def test_rope_inv_freq_without_scaling() -> None:
    expected = [1.0, 10000.0**-0.25, 10000.0**-0.5, 10000.0**-0.75]
    torch.testing.assert_close(rope_inv_freq(8, 10000.0), torch.tensor(expected))


def test_rope_inv_freq_llama3_scaling_by_hand() -> None:
    # head_dim 6, theta 1e6: unscaled inverse frequencies are 1, 1e-2 and 1e-4, so wavelengths
    # 2*pi, 200*pi (628.3) and 20000*pi. With original_max 1024, low_freq_factor 1 and
    # high_freq_factor 4, wavelengths under 1024/4 = 256 are kept, over 1024/1 are divided by
    # the factor 8, and 628.3 lies between: smooth = (1024 / (200*pi) - 1) / (4 - 1) = 0.20992,
    # giving (1 - smooth) * 1e-2 / 8 + smooth * 1e-2 = 3.0868e-3.
    scaling = RopeScaling(
        factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=1024
    )
    smooth = (1024 / (200 * math.pi) - 1) / 3
    assert smooth == pytest.approx(0.2099155, abs=1e-7)
    mid = (1 - smooth) * 1e-2 / 8 + smooth * 1e-2
    assert mid == pytest.approx(3.08679e-3, rel=1e-5)
    got = rope_inv_freq(6, 1e6, scaling)
    torch.testing.assert_close(got, torch.tensor([1.0, mid, 1e-4 / 8]), rtol=1e-6, atol=0)


def test_cos_sin_cache_layout() -> None:
    cache = rope_cos_sin_cache(4, 3, 100.0)  # inverse frequencies 1 and 0.1
    angles = torch.tensor([[0.0, 0.0], [1.0, 0.1], [2.0, 0.2]])
    torch.testing.assert_close(cache, torch.cat([angles.cos(), angles.sin()], dim=-1))
