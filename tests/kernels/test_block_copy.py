"""kernels/block_copy.py against plain torch indexing.

Unmarked tests use small shapes: on CPU they run in Triton's interpreter (see conftest.py),
on a GPU machine natively; ``fallback`` variants force the torch path the wrappers take on CPU
without the interpreter. The ``gpu`` test uses an exchange-sized bf16 cache.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

import kernels.block_copy as block_copy  # noqa: E402
from kernels.block_copy import (  # noqa: E402
    TILE_BYTES,
    copy_block_slices,
    copy_runs,
    gather_block_slices,
    scatter_block_slices,
)

SEED = 1234
TRAILING = (2, 4, 2, 8)  # (K/V, block_size, kv heads, head_dim): 128 elements a layer
BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16}


@pytest.fixture(params=["kernel", "fallback"])
def path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test through the Triton kernel, then through the torch fallback."""
    if request.param == "fallback":
        monkeypatch.setattr(block_copy, "_use_kernel", lambda device: False)
    else:  # on CPU the kernel runs only in the interpreter (conftest.py sets it)
        assert block_copy._use_kernel(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    return request.param


def assert_bits_equal(out: torch.Tensor, ref: torch.Tensor) -> None:
    """Bit-exact equality (a copy must not round or canonicalize anything)."""
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.equal(out.view(BITS[out.dtype]), ref.view(BITS[ref.dtype]))


def random_buffer(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.randn(numel, generator=torch.Generator().manual_seed(SEED)).to(device, dtype)


def ids(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64, device=device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_copy_between_views_of_one_buffer(
    dtype: torch.dtype, device: torch.device, path: str
) -> None:
    """The exchange's case: [B, L, ...] -> [2B, L/2, ...] over the same bytes, disjoint
    regions, out-of-order ids; every byte outside the destination slices is unchanged."""
    num_blocks, layers = 6, 4
    buf = random_buffer(num_blocks * layers * 128, dtype, device)
    src = buf.view(num_blocks, layers, *TRAILING)
    dst = buf.view(2 * num_blocks, layers // 2, *TRAILING)
    # sources: layers 1..2 of src blocks 4, 1, 2; destinations: dst blocks 11, 0, 7, i.e.
    # halves of src blocks 5, 0 and 3, which no source touches
    src_blocks, dst_blocks = ids([4, 1, 2], device), ids([11, 0, 7], device)
    ref = buf.clone()
    ref_src = ref.view(num_blocks, layers, *TRAILING)
    ref.view(2 * num_blocks, layers // 2, *TRAILING)[dst_blocks, 0:2] = ref_src[src_blocks, 1:3]

    copy_block_slices(src, src_blocks, (1, 3), dst, dst_blocks, (0, 2))

    for s, d in zip(src_blocks.tolist(), dst_blocks.tolist(), strict=True):
        assert_bits_equal(dst[d, 0:2], src[s, 1:3])
    assert_bits_equal(buf, ref)


def test_copy_between_buffers_partial_layers(device: torch.device, path: str) -> None:
    """Different buffers and layer offsets on both sides; a repeated source block is fine."""
    src = random_buffer(5 * 4 * 128, torch.float32, device).view(5, 4, *TRAILING)
    dst = torch.zeros((3, 6, *TRAILING), device=device)
    src_blocks, dst_blocks = ids([4, 0, 4], device), ids([2, 0, 1], device)
    ref = dst.clone()
    ref[dst_blocks, 3:6] = src[src_blocks, 1:4]
    copy_block_slices(src, src_blocks, (1, 4), dst, dst_blocks, (3, 6))
    assert_bits_equal(dst, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_scatter_round_trip(dtype: torch.dtype, device: torch.device, path: str) -> None:
    src = random_buffer(7 * 4 * 128, dtype, device).view(7, 4, *TRAILING)
    src_blocks = ids([6, 2, 3, 0], device)
    data = gather_block_slices(src, src_blocks, (2, 4))
    assert data.is_contiguous()
    assert_bits_equal(data, src[src_blocks, 2:4])

    dst = torch.zeros((10, 2, *TRAILING), dtype=dtype, device=device)
    dst_blocks = ids([9, 1, 5, 4], device)
    ref = dst.clone()
    ref[dst_blocks] = src[src_blocks, 2:4]
    scatter_block_slices(data, dst, dst_blocks, (0, 2))
    assert_bits_equal(dst, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", ["tail", "odd", "one_tile"])
@pytest.mark.parametrize("aligned", [True, False])
def test_copy_runs_lengths(
    dtype: torch.dtype, shape: str, aligned: bool, device: torch.device, path: str
) -> None:
    """Runs that end mid-tile, of odd length, or exactly one tile; 16-byte aligned starts (the
    vectorized branch) or not."""
    block = TILE_BYTES // torch.empty((), dtype=dtype).element_size()
    run_len = {"tail": 2 * block + 40, "odd": 37, "one_tile": block}[shape]
    shift = 0 if aligned else 3
    stride = run_len + 64  # gaps between runs stay untouched
    src = random_buffer(4 * stride, dtype, device)
    dst = torch.zeros(5 * stride, dtype=dtype, device=device)
    src_starts = ids([2 * stride + shift, shift, 3 * stride + shift], device)
    dst_starts = ids([4 * stride + 2 * shift, 2 * shift, stride + 8], device)
    ref = dst.clone()
    for s, d in zip(src_starts.tolist(), dst_starts.tolist(), strict=True):
        ref[d : d + run_len] = src[s : s + run_len]
    copy_runs(src, src_starts, dst, dst_starts, run_len)
    assert_bits_equal(dst, ref)


def test_copy_runs_offsets_from_data_ptr(device: torch.device, path: str) -> None:
    """Offsets count from the tensor's first element, whatever its shape or storage offset."""
    base = random_buffer(400, torch.float32, device)
    src = base[100:].view(20, 15)  # storage offset 100, 2-D
    dst = torch.zeros(300, device=device)[50:]
    copy_runs(src, ids([0, 13], device), dst, ids([200, 7], device), 20)
    ref = torch.zeros(250, device=device)
    ref[200:220], ref[7:27] = base[100:120], base[113:133]
    assert_bits_equal(dst, ref)


def test_empty_copies_are_no_ops(device: torch.device, path: str) -> None:
    buf = random_buffer(4 * 2 * 128, torch.float32, device)
    view = buf.view(4, 2, *TRAILING)
    before = buf.clone()
    none = ids([], device)
    copy_block_slices(view, none, (0, 1), view, none, (1, 2))
    copy_block_slices(view, ids([0], device), (1, 1), view, ids([1], device), (2, 2))
    copy_runs(buf, none, buf, none, 128)
    copy_runs(buf, ids([0], device), buf, ids([128], device), 0)
    scatter_block_slices(torch.empty((0, 1, *TRAILING), device=device), view, none, (0, 1))
    assert_bits_equal(buf, before)
    assert gather_block_slices(view, none, (0, 2)).shape == (0, 2, *TRAILING)


def test_invalid_arguments(device: torch.device) -> None:
    view = torch.zeros((4, 2, *TRAILING), device=device)
    other = torch.zeros((8, 1, *TRAILING), device=device)
    blocks = ids([0, 1], device)
    cases = [
        ("dtype", (view, blocks, (0, 1), other.bfloat16(), blocks, (0, 1))),
        ("is on", (view, blocks, (0, 1), other.to("meta"), blocks, (0, 1))),
        ("contiguous", (view, blocks, (0, 1), view.transpose(0, 1), blocks, (0, 1))),
        ("out of bounds", (view, blocks, (0, 1), other, blocks, (1, 2))),
        ("out of bounds", (view, blocks, (1, 0), other, blocks, (0, 1))),
        ("differ in length", (view, blocks, (0, 2), other, blocks, (0, 1))),
        ("dst_blocks has 1", (view, blocks, (0, 1), other, blocks[:1], (0, 1))),
        ("int64", (view, blocks, (0, 1), other, blocks.int(), (0, 1))),
        ("src_blocks is on", (view, blocks.to("meta"), (0, 1), other, blocks, (0, 1))),
        ("past their first two", (view, blocks, (0, 1), other.view(8, 1, 4, 2, 2, 8), blocks,
                                  (0, 1))),
    ]  # fmt: skip
    for match, args in cases:
        with pytest.raises(ValueError, match=match):
            copy_block_slices(*args)
    with pytest.raises(ValueError, match="run_len"):
        copy_runs(view, blocks, other, blocks, -1)
    with pytest.raises(ValueError, match="src_starts has 2 runs"):
        copy_runs(view, blocks, other, blocks[:1], 8)
    with pytest.raises(ValueError, match="data must have shape"):
        scatter_block_slices(torch.zeros((2, 2, *TRAILING), device=device), other, blocks, (0, 1))
    with pytest.raises(ValueError, match="src_layers"):
        gather_block_slices(view, blocks, (0, 3))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(("src_layers", "dst_layers"), [((8, 24), (0, 16)), ((5, 6), (15, 16))])
def test_gpu_exchange_sized(src_layers: tuple[int, int], dst_layers: tuple[int, int]) -> None:
    """64 blocks of a [128, 32, 2, 16, 8, 128] bf16 cache (2 MiB blocks) into its [256, 16, ...]
    re-view: 1 MiB and 64 KiB runs; then a gather / scatter round trip."""
    device = torch.device("cuda")
    trailing = (2, 16, 8, 128)
    num_blocks = 128
    buf = torch.randn(num_blocks * 32 * 2 * 16 * 8 * 128, device=device, dtype=torch.bfloat16)
    src = buf.view(num_blocks, 32, *trailing)
    dst = buf.view(2 * num_blocks, 16, *trailing)
    gen = torch.Generator().manual_seed(SEED)
    src_blocks = torch.randperm(64, generator=gen).to(device)  # src blocks 0..63
    dst_blocks = (128 + torch.randperm(128, generator=gen)[:64]).to(device)  # 64..127's halves
    (a, b), (x, y) = src_layers, dst_layers
    ref = buf.clone()
    ref.view(2 * num_blocks, 16, *trailing)[dst_blocks, x:y] = ref.view(num_blocks, 32, *trailing)[
        src_blocks, a:b
    ]
    copy_block_slices(src, src_blocks, src_layers, dst, dst_blocks, dst_layers)
    torch.cuda.synchronize()
    assert_bits_equal(buf, ref)

    data = gather_block_slices(src, src_blocks, src_layers)
    assert_bits_equal(data, src[src_blocks, a:b])
    out = torch.zeros_like(dst)
    scatter_block_slices(data, out, dst_blocks, dst_layers)
    expected = torch.zeros_like(dst)
    expected[dst_blocks, x:y] = data
    torch.cuda.synchronize()
    assert_bits_equal(out, expected)
