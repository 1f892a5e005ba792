"""Triton kernels against their torch references.

Unmarked tests use small shapes: on CPU they run in Triton's interpreter (see conftest.py),
on a GPU machine natively. ``gpu`` tests use realistic shapes in bf16 and compare with a
float32 reference by relative error.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from kernels.activation import silu_and_mul, silu_and_mul_ref  # noqa: E402
from kernels.norm import rms_norm, rms_norm_ref  # noqa: E402
from kernels.paged_attention import (  # noqa: E402
    paged_attention,
    paged_attention_ref,
    paged_decode_attention,
    paged_prefill_attention,
    write_kv,
    write_kv_ref,
)
from kernels.paged_decode import choose_num_splits  # noqa: E402
from kernels.paged_prefill import PrefillTiles  # noqa: E402
from kernels.rope import (  # noqa: E402
    apply_rope,
    apply_rope_ref,
    rope_and_write_kv,
    rope_cos_sin_cache,
)

SEED = 1234
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def assert_matches(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Elementwise closeness at the output dtype's precision (1 ulp of slack for bf16/fp16:
    the interpreter rounds by truncation, the GPU to nearest even)."""
    assert out.shape == ref.shape and out.dtype == ref.dtype
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[out.dtype]
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def make_kv_cache(
    num_blocks: int,
    block_size: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
    layers: int = 2,
) -> torch.Tensor:
    """Random [num_blocks, layers, 2, block_size, num_kv_heads, head_dim]."""
    shape = (num_blocks, layers, 2, block_size, num_kv_heads, head_dim)
    return torch.randn(shape, dtype=dtype, device=device)


def make_batch(
    q_lens: list[int], prefix_lens: list[int], block_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Block tables (distinct shuffled block ids), seq_lens and query_start_loc for a batch.

    Returns ``(block_tables, seq_lens, query_start_loc, num_blocks)``; sequence i has
    ``prefix_lens[i]`` cached tokens followed by ``q_lens[i]`` new ones.
    """
    seq_lens = [q + p for q, p in zip(q_lens, prefix_lens, strict=True)]
    width = max(math.ceil(s / block_size) for s in seq_lens) + 1  # one spare column
    num_blocks = len(seq_lens) * width + 3
    ids = torch.randperm(num_blocks)[: len(seq_lens) * width].view(len(seq_lens), width)
    starts = torch.tensor([0, *q_lens]).cumsum(0)
    return (
        ids.to(torch.int32).to(device),
        torch.tensor(seq_lens, dtype=torch.int32, device=device),
        starts.to(torch.int32).to(device),
        num_blocks,
    )


# ---------------------------------------------------------------- norm, activation, rope


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_ref(
    dtype: torch.dtype, with_residual: bool, device: torch.device
) -> None:
    torch.manual_seed(SEED)
    x = torch.randn(7, 2 * 96, dtype=dtype, device=device)[:, :96]  # row-strided view
    residual = torch.randn(7, 96, dtype=dtype, device=device) if with_residual else None
    weight = torch.randn(96, dtype=torch.float32, device=device)
    normed, new_residual = rms_norm(x, weight, 1e-6, residual)
    ref_normed, ref_residual = rms_norm_ref(x, weight, 1e-6, residual)
    assert_matches(normed, ref_normed)
    assert_matches(new_residual, ref_residual)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_matches_ref(dtype: torch.dtype, device: torch.device) -> None:
    torch.manual_seed(SEED)
    x = torch.randn(5, 2 * 80, dtype=dtype, device=device)
    assert_matches(silu_and_mul(x), silu_and_mul_ref(x))


def _qkv(
    num_tokens: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v as strided views of one fused projection output, as a model produces them."""
    qkv = torch.randn(num_tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, device=device)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=1)
    return (
        q.view(num_tokens, heads, head_dim),
        k.view(num_tokens, kv_heads, head_dim),
        v.view(num_tokens, kv_heads, head_dim),
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_apply_rope_matches_ref(dtype: torch.dtype, device: torch.device) -> None:
    torch.manual_seed(SEED)
    q, k, _ = _qkv(6, 4, 2, 32, dtype, device)
    positions = torch.tensor([0, 1, 7, 63, 2, 40], device=device)
    cos_sin = rope_cos_sin_cache(32, 64, 10000.0).to(device)
    q_rot, k_rot = apply_rope(q, k, positions, cos_sin)
    ref_q, ref_k = apply_rope_ref(q, k, positions, cos_sin)
    assert_matches(q_rot, ref_q)
    assert_matches(k_rot, ref_k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size", [16, 32])
def test_rope_and_write_kv_matches_refs(
    dtype: torch.dtype, block_size: int, device: torch.device
) -> None:
    torch.manual_seed(SEED)
    q, k, v = _qkv(5, 8, 2, 16, dtype, device)
    positions = torch.tensor([3, 4, 5, 0, 9], device=device)
    slots = torch.tensor([block_size + 3, -1, 5, 2 * block_size, 3 * block_size - 1], device=device)
    cos_sin = rope_cos_sin_cache(16, 16, 500000.0).to(device)
    cache = make_kv_cache(4, block_size, 2, 16, dtype, device)
    ref_cache = cache.clone()

    q_rot, k_rot = rope_and_write_kv(q, k, v, positions, cos_sin, cache, 1, slots)
    ref_q, ref_k = apply_rope_ref(q, k, positions, cos_sin)
    write_kv_ref(ref_k, v, ref_cache, 1, slots)
    assert_matches(q_rot, ref_q)
    assert_matches(k_rot, ref_k)
    assert_matches(cache, ref_cache)  # slot -1 skipped, other slots and layers untouched


@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
def test_write_kv_skips_padding_slots(slot_dtype: torch.dtype, device: torch.device) -> None:
    torch.manual_seed(SEED)
    _, k, v = _qkv(4, 2, 2, 32, torch.float16, device)
    cache = make_kv_cache(3, 16, 2, 32, torch.float32, device, layers=3)
    ref_cache = cache.clone()
    slots = torch.tensor([-1, 17, 0, 47], dtype=slot_dtype, device=device)
    write_kv(k, v, cache, 2, slots)
    write_kv_ref(k, v, ref_cache, 2, slots)
    torch.testing.assert_close(cache, ref_cache, rtol=0, atol=0)


# ---------------------------------------------------------------- paged attention


def _run_paged(
    q_lens: list[int],
    prefix_lens: list[int],
    heads: tuple[int, int],
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random q and cache for a batch; returns (q, cache, block_tables, seq_lens, qsl, ref)."""
    torch.manual_seed(SEED)
    block_tables, seq_lens, qsl, num_blocks = make_batch(q_lens, prefix_lens, block_size, device)
    cache = make_kv_cache(num_blocks, block_size, heads[1], head_dim, dtype, device)
    q = torch.randn(sum(q_lens), heads[0], head_dim, dtype=dtype, device=device)
    ref = paged_attention_ref(q, cache, 1, block_tables, seq_lens, qsl, head_dim**-0.5)
    return q, cache, block_tables, seq_lens, qsl, ref


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("block_size", [16, 32, 128])
@pytest.mark.parametrize("num_splits", [1, 3, None])
def test_paged_decode_matches_ref(
    dtype: torch.dtype, group: int, block_size: int, num_splits: int | None, device: torch.device
) -> None:
    context = [1, 37, 100, 16]  # new token included; 1 = a fresh sequence
    q, cache, tables, seq_lens, _, ref = _run_paged(
        [1] * 4, [c - 1 for c in context], (2 * group, 2), 32, block_size, dtype, device
    )
    out = paged_decode_attention(q, cache, 1, tables, seq_lens, 32**-0.5, num_splits)
    assert_matches(out, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("block_size", [16, 32])
def test_paged_prefill_chunked_matches_ref(
    dtype: torch.dtype, group: int, block_size: int, device: torch.device
) -> None:
    # A fresh prefill, a chunk over a cached prefix, a decode, an idle sequence, a long chunk.
    q_lens, prefix_lens = [5, 40, 1, 0, 130], [0, 70, 20, 9, 33]
    q, cache, tables, seq_lens, qsl, ref = _run_paged(
        q_lens, prefix_lens, (2 * group, 2), 16, block_size, dtype, device
    )
    out = paged_prefill_attention(q, cache, 1, tables, seq_lens, qsl, max(q_lens), 16**-0.5)
    assert_matches(out, ref)


@pytest.mark.parametrize("tiles", [(32, 16, 4, 1), (16, 64, 4, 3)])
def test_paged_prefill_other_tiles_match_ref(tiles: tuple, device: torch.device) -> None:
    """The benchmark's tile sweep (``--only chunks``) runs the same attention: query tiles
    shorter than a chunk, key tiles shorter and longer than a 16-token block."""
    q_lens, prefix_lens = [5, 40, 1, 70], [0, 70, 20, 33]
    q, cache, tables, seq_lens, qsl, ref = _run_paged(
        q_lens, prefix_lens, (8, 2), 16, 16, torch.float32, device
    )
    out = paged_prefill_attention(
        q, cache, 1, tables, seq_lens, qsl, max(q_lens), 16**-0.5, tiles=PrefillTiles(*tiles)
    )
    assert_matches(out, ref)


@pytest.mark.parametrize("max_query_len", [None, "given"])
def test_paged_attention_dispatches_decode_and_prefill(
    max_query_len: str | None, device: torch.device
) -> None:
    for q_lens, prefix_lens in (([1, 1, 1], [4, 60, 0]), ([3, 1], [10, 50])):
        q, cache, tables, seq_lens, qsl, ref = _run_paged(
            q_lens, prefix_lens, (4, 2), 32, 16, torch.float32, device
        )
        hint = max(q_lens) if max_query_len == "given" else None
        out = paged_attention(q, cache, 1, tables, seq_lens, qsl, 32**-0.5, hint)
        assert_matches(out, ref)


@pytest.mark.parametrize("decodes", [[1, 1, 1], [1]])
def test_a_mixed_step_splits_its_leading_decodes_off_to_the_decode_kernel(
    decodes: list[int], device: torch.device
) -> None:
    """The Triton backend on a mixed step whose metadata names its leading decodes
    (``num_decodes``): the decode kernel for those rows and the prefill kernel for the rest,
    into one output, equal to the reference over the whole step."""
    from attention.metadata import AttentionMetadata
    from attention.triton_backend import TritonBackend

    q_lens = [*decodes, 7, 1, 40]  # a decode after a chunk stays with the prefill kernel
    prefix_lens = [60, 3, 17][: len(decodes)] + [9, 33, 0]
    q, cache, tables, seq_lens, qsl, ref = _run_paged(
        q_lens, prefix_lens, (8, 2), 32, 16, torch.float32, device
    )
    slots = torch.zeros(sum(q_lens), dtype=torch.int64, device=device)
    meta = AttentionMetadata(slots, tables, seq_lens, qsl, max(q_lens), int(seq_lens.max()))
    split = meta.with_decodes(len(decodes))
    assert split.num_decodes == len(decodes)
    assert split.prefill_query_start_loc.tolist() == [0, 7, 8, 48]
    out = TritonBackend().attention(q, cache, 1, split)
    assert_matches(out, ref)
    with pytest.raises(ValueError, match="out must be \\[3, 8, 32\\]"):
        paged_decode_attention(q[:3], cache, 1, tables[:3], seq_lens[:3], 1.0, out=out[:2])


def test_choose_num_splits() -> None:
    assert choose_num_splits(1, 8, 4096, 132) == 32
    assert choose_num_splits(1, 8, 1024, 132) == 8
    assert choose_num_splits(8, 8, 4096, 132) == 5
    assert choose_num_splits(64, 8, 1024, 132) == 1
    assert choose_num_splits(1, 1, 10**6, 132) == 64
    assert choose_num_splits(4, 8, 16, 132) == 1


def test_wrappers_name_the_bad_argument(device) -> None:
    q, cache, tables, seq_lens, _, _ = _run_paged(
        [1, 1], [3, 5], (4, 2), 16, 16, torch.float32, device
    )
    cases = [
        (dict(block_tables=tables.long()), "block_tables"),
        (dict(seq_lens=seq_lens[:1]), "seq_lens"),
        (dict(layer=2), "layer"),
        (dict(kv_cache=cache.transpose(3, 4)), "kv_cache"),
        (dict(kv_cache=cache.half()), "kv_cache"),
        (dict(q=q[:, :3]), "num_heads"),
        (dict(num_splits=0), "num_splits"),
        (dict(scale=float("nan")), "scale"),
    ]
    args = dict(q=q, kv_cache=cache, layer=1, block_tables=tables, seq_lens=seq_lens, scale=0.25)
    for override, name in cases:
        with pytest.raises(ValueError, match=name):
            paged_decode_attention(**{**args, **override})
    with pytest.raises(ValueError, match="residual"):
        rms_norm(q[:, 0], torch.ones(16, device=device), 1e-6, q[:, 1].half())
    with pytest.raises(ValueError, match="slot_mapping"):
        write_kv(q[:, :2], q[:, :2], cache, 0, torch.zeros(2, device=device))


# ---------------------------------------------------------------- GPU, realistic shapes

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPU_HEADS = (32, 8)
GPU_HEAD_DIM = 128


def _float32_reference(
    q: torch.Tensor,
    cache: torch.Tensor,
    tables: torch.Tensor,
    seq_lens: torch.Tensor,
    qsl: torch.Tensor,
) -> torch.Tensor:
    """paged_attention_ref on float32 copies of bf16 inputs: returns float32."""
    return paged_attention_ref(
        q.float(), cache.float(), 1, tables, seq_lens, qsl, GPU_HEAD_DIM**-0.5
    )


def _assert_gpu_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert not out.isnan().any(), "NaN in kernel output"
    err = relative_error(out, ref)
    assert err <= 1e-2, f"relative error {err:.3e} > 1e-2"


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("block_size", [16, 128])
@pytest.mark.parametrize(("batch", "context"), [(64, 1024), (1, 4096)])
@pytest.mark.parametrize("num_splits", [None, 1, 8])
def test_gpu_decode_bf16(block_size: int, batch: int, context: int, num_splits: int | None) -> None:
    device = torch.device("cuda")
    torch.manual_seed(SEED)
    contexts = [context - 7 * i for i in range(batch)]  # ragged lengths, last block partial
    tables, seq_lens, qsl, num_blocks = make_batch(
        [1] * batch, [c - 1 for c in contexts], block_size, device
    )
    cache = make_kv_cache(
        num_blocks, block_size, GPU_HEADS[1], GPU_HEAD_DIM, torch.bfloat16, device
    )
    q = torch.randn(batch, GPU_HEADS[0], GPU_HEAD_DIM, dtype=torch.bfloat16, device=device)
    out = paged_decode_attention(q, cache, 1, tables, seq_lens, GPU_HEAD_DIM**-0.5, num_splits)
    _assert_gpu_close(out, _float32_reference(q, cache, tables, seq_lens, qsl))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("block_size", [16, 128])
def test_gpu_chunked_prefill_bf16(block_size: int) -> None:
    device = torch.device("cuda")
    torch.manual_seed(SEED)
    q_lens, prefix_lens = [4096, 1000, 1, 300], [0, 3000, 2047, 17]
    tables, seq_lens, qsl, num_blocks = make_batch(q_lens, prefix_lens, block_size, device)
    cache = make_kv_cache(
        num_blocks, block_size, GPU_HEADS[1], GPU_HEAD_DIM, torch.bfloat16, device
    )
    q = torch.randn(sum(q_lens), GPU_HEADS[0], GPU_HEAD_DIM, dtype=torch.bfloat16, device=device)
    out = paged_attention(q, cache, 1, tables, seq_lens, qsl, GPU_HEAD_DIM**-0.5, max(q_lens))
    _assert_gpu_close(out, _float32_reference(q, cache, tables, seq_lens, qsl))


@pytest.mark.gpu
@gpu
def test_gpu_norm_activation_rope_bf16() -> None:
    device = torch.device("cuda")
    torch.manual_seed(SEED)
    x, residual = torch.randn(2, 8192, 4096, dtype=torch.bfloat16, device=device)
    weight = torch.randn(4096, dtype=torch.bfloat16, device=device)
    normed, summed = rms_norm(x, weight, 1e-5, residual)
    ref_normed, ref_summed = rms_norm_ref(x.float(), weight, 1e-5, residual.float())
    _assert_gpu_close(normed, ref_normed)
    _assert_gpu_close(summed, ref_summed)
    gate_up = torch.randn(8192, 2 * 4096, dtype=torch.bfloat16, device=device)
    _assert_gpu_close(silu_and_mul(gate_up), silu_and_mul_ref(gate_up.float()))
    q, k, v = _qkv(8192, *GPU_HEADS, GPU_HEAD_DIM, torch.bfloat16, device)
    positions = torch.randint(0, 8192, (8192,), device=device)
    cos_sin = rope_cos_sin_cache(GPU_HEAD_DIM, 8192, 500000.0).to(device)
    cache = torch.zeros(
        8192 // 16 + 1, 1, 2, 16, 8, GPU_HEAD_DIM, dtype=torch.bfloat16, device=device
    )
    slots = torch.randperm(8192 + 16, device=device)[:8192]
    q_rot, k_rot = rope_and_write_kv(q, k, v, positions, cos_sin, cache, 0, slots)
    ref_q, ref_k = apply_rope_ref(q.float(), k.float(), positions, cos_sin)
    _assert_gpu_close(q_rot, ref_q)
    _assert_gpu_close(k_rot, ref_k)
    ref_cache = torch.zeros_like(cache)
    write_kv_ref(k_rot, v, ref_cache, 0, slots)
    torch.testing.assert_close(cache, ref_cache, rtol=0, atol=0)


def _compiled_variants(kernel: object) -> int:
    """Variants of a Triton kernel compiled so far on any device. Triton 3.x keeps one cache
    per device in ``JITFunction.device_caches``, whose first item maps a specialization key
    to its compiled kernel; fails if this Triton keeps them elsewhere."""
    caches = kernel.device_caches  # type: ignore[attr-defined]
    return sum(len(entry[0]) for entry in caches.values())


@pytest.mark.gpu
@gpu
def test_gpu_serving_shapes_compile_nothing_after_warm_up() -> None:
    """After ``paged_decode.warm_up`` and one step of each kind, the steps a server runs
    compile no further variant: mixed steps with 1-7 leading decodes (metadata sliced past
    them, so at every 4-byte alignment), decode batches from 1 to 40 sequences whose split
    counts span 1-64, and RoPE with sliced positions and slots. A compile in the middle of
    serving cost a 0.15-0.3 s token gap (docs/benchmarks.md)."""
    from attention.metadata import AttentionMetadata
    from attention.triton_backend import TritonBackend
    from kernels import paged_attention as pa
    from kernels import paged_decode, paged_prefill, rope

    device, dtype, bs = torch.device("cuda"), torch.bfloat16, 16
    heads, kv_heads = GPU_HEADS
    paged_decode.warm_up(device, dtype, heads, kv_heads, GPU_HEAD_DIM, bs)
    backend = TritonBackend()

    def mixed_step(num_decodes: int, prompt: int) -> None:
        q_lens = [1] * num_decodes + [prompt, 3]
        prefix_lens = [200 + 37 * i for i in range(num_decodes)] + [0, 90]
        q, cache, tables, seq_lens, qsl, _ = _run_paged(
            q_lens, prefix_lens, GPU_HEADS, GPU_HEAD_DIM, bs, dtype, device
        )
        slots = torch.zeros(sum(q_lens), dtype=torch.int64, device=device)
        meta = AttentionMetadata(slots, tables, seq_lens, qsl, max(q_lens), int(seq_lens.max()))
        backend.attention(q, cache, 1, meta.with_decodes(num_decodes) if num_decodes else meta)

    def rope_step(num_tokens: int, skip: int) -> None:
        q, k, v = _qkv(num_tokens + skip, heads, kv_heads, GPU_HEAD_DIM, dtype, device)
        positions = torch.arange(num_tokens + skip, device=device)
        cos_sin = rope_cos_sin_cache(GPU_HEAD_DIM, 4096, 500000.0).to(device)
        cache = torch.zeros(64, 1, 2, bs, kv_heads, GPU_HEAD_DIM, dtype=dtype, device=device)
        slots = torch.arange(num_tokens + skip, device=device)
        rope_and_write_kv(q[skip:], k[skip:], v[skip:], positions[skip:], cos_sin, cache, 0,
                          slots[skip:])  # fmt: skip
        pa.write_kv(k[skip:], v[skip:], cache, 0, slots[skip:])

    mixed_step(0, 300)  # the first prefill and RoPE steps compile their one variant
    mixed_step(4, 300)
    rope_step(8, 0)
    kernels = {
        "decode": paged_decode._paged_decode_kernel,
        "merge": paged_decode._merge_splits_kernel,
        "prefill": paged_prefill._paged_prefill_kernel,
        "rope": rope._rope_kernel,
        "write_kv": pa._write_kv_kernel,
    }
    before = {name: _compiled_variants(k) for name, k in kernels.items()}
    assert before["merge"] >= 6, before  # every power-of-2 split bound from 2 to 64
    for num_decodes in range(1, 8):
        mixed_step(num_decodes, 57 + num_decodes)
    for batch in (1, 2, 3, 5, 8, 13, 21, 40):
        context = 4096 // batch
        tables, seq_lens, _, num_blocks = make_batch([1] * batch, [context - 1] * batch, bs, device)
        cache = make_kv_cache(num_blocks, bs, kv_heads, GPU_HEAD_DIM, dtype, device)
        q = torch.randn(batch, heads, GPU_HEAD_DIM, dtype=dtype, device=device)
        for splits in (None, 3, 7, 12, 24, 48, 64):
            paged_decode_attention(q, cache, 1, tables, seq_lens, 0.1, splits)
    for skip in (1, 2, 3):
        rope_step(5, skip)
    torch.cuda.synchronize()
    after = {name: _compiled_variants(k) for name, k in kernels.items()}
    assert after == before
