"""The skinny GEMM (kernels/skinny_gemm.py) against its torch references.

Unmarked tests use small shapes whose K and N are not multiples of the blocks: on CPU they run
in Triton's interpreter (see conftest.py), on a GPU natively. ``gpu`` tests use Llama-3-8B's
projections in bf16 and compare with a float32 reference by relative error.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from kernels.skinny_gemm import (  # noqa: E402
    SKINNY_MAX_ROWS,
    SkinnyConfig,
    choose_skinny_config,
    linear_ref,
    rms_norm_linear,
    rms_norm_linear_ref,
    silu_and_mul_linear,
    silu_and_mul_linear_ref,
    skinny_linear,
)

SEED = 1234
K, N = 96, 80
ROWS = [1, 3, 16]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EPS = 1e-5


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm()).item()


def _close(out: torch.Tensor, ref: torch.Tensor) -> None:
    """A dot over K terms: elementwise at the dtype's precision, relative to the output's scale
    (one bf16 rounding of a product's inputs moves a sum of ~N(0, K) terms by ~1e-2)."""
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert not out.isnan().any(), "NaN in kernel output"
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
    else:
        assert relative_error(out, ref) <= 1e-2


def _weights(n: int, k: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[n, 2k] storage viewed as [n, k]: a weight whose rows are not contiguous."""
    return torch.randn(n, 2 * k, dtype=dtype, device=device)[:, :k]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", ROWS)
def test_skinny_linear_matches_ref(m: int, dtype: torch.dtype, device: torch.device) -> None:
    torch.manual_seed(SEED)
    x = torch.randn(m, 2 * K, dtype=dtype, device=device)[:, :K]  # row-strided view
    weight = _weights(N, K, dtype, device)
    bias = torch.randn(N, dtype=torch.float32, device=device)
    _close(skinny_linear(x, weight), linear_ref(x, weight))
    _close(skinny_linear(x, weight, bias), linear_ref(x, weight, bias))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", ROWS)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_linear_matches_ref(
    m: int, dtype: torch.dtype, with_residual: bool, device: torch.device
) -> None:
    torch.manual_seed(SEED)
    x = torch.randn(m, K, dtype=dtype, device=device)
    residual = torch.randn(m, K, dtype=dtype, device=device) if with_residual else None
    residual_before = None if residual is None else residual.clone()
    norm_weight = torch.rand(K, dtype=dtype, device=device) + 0.5
    weight = _weights(N, K, dtype, device)
    bias = torch.randn(N, dtype=dtype, device=device) if with_residual else None
    out, new_residual = rms_norm_linear(x, norm_weight, EPS, weight, residual, bias)
    ref, ref_residual = rms_norm_linear_ref(x, norm_weight, EPS, weight, residual, bias)
    _close(out, ref)
    if residual is None:
        assert new_residual is x
    else:
        assert new_residual.dtype == dtype and new_residual.is_contiguous()
        if dtype == torch.float32:
            assert torch.equal(new_residual, x + residual_before)
        else:  # the interpreter rounds bf16 by truncation, torch to nearest: 1 ulp apart
            torch.testing.assert_close(new_residual, ref_residual, rtol=1.6e-2, atol=1.6e-2)
        assert torch.equal(residual, residual_before)  # the input residual is not written


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", ROWS)
def test_silu_and_mul_linear_matches_ref(m: int, dtype: torch.dtype, device: torch.device) -> None:
    torch.manual_seed(SEED)
    gate_up = torch.randn(m, 2 * K, dtype=dtype, device=device)
    weight = _weights(N, K, dtype, device)
    _close(silu_and_mul_linear(gate_up, weight), silu_and_mul_linear_ref(gate_up, weight))


@pytest.mark.parametrize(
    "config", [SkinnyConfig(1, 16, 32), SkinnyConfig(16, 32, 16), SkinnyConfig(16, 64, 128)]
)
def test_forced_configs_match_ref(config: SkinnyConfig, device: torch.device) -> None:
    """Several K tiles, a partial last N tile, both paths; with a residual."""
    torch.manual_seed(SEED)
    x, residual = torch.randn(2, 1, K, device=device)
    norm_weight = torch.rand(K, device=device)
    weight = _weights(N, K, torch.float32, device)
    out, new_residual = rms_norm_linear(x, norm_weight, EPS, weight, residual, config=config)
    ref, _ = rms_norm_linear_ref(x, norm_weight, EPS, weight, residual)
    _close(out, ref)
    torch.testing.assert_close(new_residual, x + residual, rtol=0, atol=0)


def test_zero_rows(device: torch.device) -> None:
    x = torch.empty(0, K, device=device)
    weight = torch.randn(N, K, device=device)
    assert skinny_linear(x, weight).shape == (0, N)


def test_choose_skinny_config() -> None:
    one_row = dict(num_warps=4, num_stages=1)
    assert choose_skinny_config(1, 4096, 4096) == SkinnyConfig(1, 16, 512, **one_row)
    assert choose_skinny_config(1, 6144, 4096) == SkinnyConfig(1, 16, 512, **one_row)
    assert choose_skinny_config(1, 28672, 4096) == SkinnyConfig(1, 64, 128, **one_row)
    assert choose_skinny_config(1, 80, 3) == SkinnyConfig(1, 16, 16, **one_row)
    assert choose_skinny_config(8, 6144, 4096) == SkinnyConfig(16, 16, 128)
    assert choose_skinny_config(16, 128256, 4096) == SkinnyConfig(16, 64, 64)
    assert choose_skinny_config(2, 80, 96) == SkinnyConfig(16, 16, 128)
    assert choose_skinny_config(16, 4096, 4096, sms=16) == SkinnyConfig(16, 64, 64)
    with pytest.raises(ValueError, match="m must be"):
        choose_skinny_config(17, 4096, 4096)


def test_wrappers_name_the_bad_argument(device: torch.device) -> None:
    x = torch.randn(2, K, device=device)
    weight = torch.randn(N, K, device=device)
    norm_weight = torch.ones(K, device=device)
    cases = [
        (lambda: skinny_linear(x[0], weight), "x"),
        (lambda: skinny_linear(torch.randn(SKINNY_MAX_ROWS + 1, K, device=device), weight), "x"),
        (lambda: skinny_linear(x, weight[:, :-1]), "weight"),
        (lambda: skinny_linear(x, weight.half()), "weight"),
        (lambda: skinny_linear(x, weight.t()), "weight"),
        (lambda: skinny_linear(x, torch.randn(N, K, device="meta")), "weight"),
        (lambda: skinny_linear(x.t(), weight), "x"),
        (lambda: skinny_linear(x.int(), weight), "x"),
        (lambda: skinny_linear(x, weight, torch.ones(N + 1, device=device)), "bias"),
        (lambda: skinny_linear(x, weight, config=SkinnyConfig(1, 16, 32)), "config"),
        (lambda: rms_norm_linear(x, norm_weight[:-1], EPS, weight), "norm_weight"),
        (lambda: rms_norm_linear(x, norm_weight, EPS, weight, x.half()), "residual"),
        (lambda: rms_norm_linear(x, norm_weight, EPS, weight, x[:1]), "residual"),
        (lambda: silu_and_mul_linear(x[:, :-1], weight), "gate_up"),
        (lambda: silu_and_mul_linear(x, weight), "weight"),
    ]
    for call, name in cases:
        with pytest.raises(ValueError, match=name):
            call()
    if device.type == "cpu":  # the interpreter accepts CPU tensors; CUDA kernels reject them
        return
    with pytest.raises(ValueError, match="x"):
        skinny_linear(x.cpu(), weight)


# ---------------------------------------------------------------- GPU, Llama-3-8B shapes

HIDDEN, INTER = 4096, 14336
GPU_SHAPES = {"qkv": (6144, HIDDEN), "o": (HIDDEN, HIDDEN), "gate_up": (2 * INTER, HIDDEN)}


def _gpu_close(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert not out.isnan().any(), "NaN in kernel output"
    err = relative_error(out, ref)
    assert err <= 1e-2, f"relative error {err:.3e} > 1e-2"


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 8, 16])
@pytest.mark.parametrize("proj", sorted(GPU_SHAPES))
def test_gpu_projections_bf16(proj: str, m: int) -> None:
    """Plain and rms_norm variants at one projection's shape, vs float32 references."""
    torch.manual_seed(SEED)
    n, k = GPU_SHAPES[proj]
    dev, bf16 = torch.device("cuda"), torch.bfloat16
    x, residual = torch.randn(2, m, k, dtype=bf16, device=dev)
    weight = torch.randn(n, k, dtype=bf16, device=dev) * k**-0.5
    norm_weight = torch.rand(k, dtype=bf16, device=dev) + 0.5
    _gpu_close(skinny_linear(x, weight), linear_ref(x.float(), weight))
    out, new_residual = rms_norm_linear(x, norm_weight, EPS, weight, residual)
    ref, ref_residual = rms_norm_linear_ref(x.float(), norm_weight, EPS, weight, residual.float())
    _gpu_close(out, ref)
    _gpu_close(new_residual, ref_residual)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 8, 16])
def test_gpu_down_proj_bf16(m: int) -> None:
    torch.manual_seed(SEED)
    dev, bf16 = torch.device("cuda"), torch.bfloat16
    gate_up = torch.randn(m, 2 * INTER, dtype=bf16, device=dev)
    weight = torch.randn(HIDDEN, INTER, dtype=bf16, device=dev) * INTER**-0.5
    _gpu_close(
        silu_and_mul_linear(gate_up, weight), silu_and_mul_linear_ref(gate_up.float(), weight)
    )
