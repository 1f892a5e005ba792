"""Skinny GEMM: ``y = x @ W^T`` for a few rows (decode batches), with the kernel before it fused.

At decode, a projection multiplies a handful of token rows (``M <= 16``) by a weight of tens of
MB, so its time is the weight read: the kernel should stream ``W`` from HBM exactly once at
copy bandwidth, and anything that only touches the few input rows is nearly free when done on
the way. Three variants share one kernel:

- :func:`skinny_linear`: ``x @ W^T (+ bias)``, e.g. ``o_proj``;
- :func:`rms_norm_linear`: ``RMSNorm(x + residual) @ W^T``, also storing ``x + residual`` as
  the new residual stream: Llama's ``input_layernorm`` + ``qkv_proj`` and
  ``post_attention_layernorm`` + ``gate_up_proj`` in one launch instead of two;
- :func:`silu_and_mul_linear`: ``(SiLU(gate) * up) @ W^T``: ``silu_and_mul`` + ``down_proj``.

Design (bandwidth at M = 1..16, CUDA-graph friendly): each program owns ``BLOCK_N`` output
columns (``BLOCK_N`` rows of ``W``) for every row of ``x`` and walks ``K`` in ``BLOCK_K``
tiles, accumulating in float32; no split-K, so there is no second pass and no atomics, and
``N / BLOCK_N`` programs (>= 2 per SM for ``N >= 4096``, see :func:`choose_skinny_config`) keep
enough loads in flight. One row (``BLOCK_M == 1``) multiplies on the CUDA cores: the
``[BLOCK_N, BLOCK_K]`` tile of ``W`` times the broadcast row, summed once after the loop; 2..16
rows pad to 16 and use ``tl.dot`` (tensor cores; the MMA's waste is free, the kernel waits on
memory). Every program re-reads the few input rows, which stay in L2. The grid and every
constexpr depend only on shapes, so a captured graph replays the same launch.

The RMSNorm prologue needs the whole row's mean square, known only after the last ``K`` tile.
Since ``1/rms`` is one factor per row it comes out of the sum: the loop accumulates
``(h * norm_weight) @ W^T`` and the row's sum of squares together, and the epilogue scales by
``rsqrt(mean(h^2) + eps)``. ``h = x + residual`` is rounded to x.dtype first, as
:func:`kernels.norm.rms_norm_ref` does; what differs from the unfused pair is only where the
normed input is rounded (on the tensor-core path ``h * norm_weight`` is rounded to W's dtype,
where the unfused path rounds ``h * norm_weight / rms``). In fp16 that product must stay in
fp16's range, as ``h`` does whenever the norm weight is at most about 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels._triton import (
    FLOAT_DTYPES,
    check_device,
    check_shape,
    check_tensor,
    jit,
    next_pow2,
    num_sms,
    tl,
    triton,
)
from kernels.activation import silu_and_mul_ref
from kernels.norm import rms_norm_ref

SKINNY_MAX_ROWS = 16
"""Most rows of ``x`` one launch serves (the ``tl.dot`` tile's M)."""

_PLAIN, _RMS_NORM, _SILU_MUL = 0, 1, 2


# ---------------------------------------------------------------- torch references


def linear_ref(
    x: torch.Tensor,  # [M, K]
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None = None,  # [N]
) -> torch.Tensor:
    """``x @ weight^T + bias`` computed in float32, returned in x.dtype: [M, N]."""
    b = None if bias is None else bias.float()
    return F.linear(x.float(), weight.float(), b).to(x.dtype)


def rms_norm_linear_ref(
    x: torch.Tensor,  # [M, K]
    norm_weight: torch.Tensor,  # [K]
    eps: float,
    weight: torch.Tensor,  # [N, K]
    residual: torch.Tensor | None = None,  # [M, K]
    bias: torch.Tensor | None = None,  # [N]
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`kernels.norm.rms_norm_ref` then :func:`linear_ref`: returns
    ``(linear(normed), x + residual)`` ([M, N] and [M, K], x.dtype; the new residual is ``x``
    itself when ``residual`` is None)."""
    normed, new_residual = rms_norm_ref(x, norm_weight, eps, residual)
    return linear_ref(normed, weight, bias), new_residual


def silu_and_mul_linear_ref(
    gate_up: torch.Tensor,  # [M, 2 * I]: [gate | up]
    weight: torch.Tensor,  # [N, I]
    bias: torch.Tensor | None = None,  # [N]
) -> torch.Tensor:
    """:func:`kernels.activation.silu_and_mul_ref` (rounded to gate_up.dtype) then
    :func:`linear_ref`: [M, N] in gate_up.dtype."""
    return linear_ref(silu_and_mul_ref(gate_up), weight, bias)


# ---------------------------------------------------------------- configuration


@dataclass(frozen=True)
class SkinnyConfig:
    """Launch parameters of one skinny GEMM; all compile-time."""

    block_m: int  # 1: CUDA-core path for one row; 16: tl.dot for 2..16 rows
    block_n: int  # output columns (rows of W) per program
    block_k: int  # K elements per loop step
    num_warps: int = 4
    num_stages: int = 4  # software-pipeline depth of the tl.dot path's loads


def choose_skinny_config(m: int, n: int, k: int, sms: int = 132) -> SkinnyConfig:
    """A fixed config for ``[m, k] @ [n, k]^T`` on a GPU with ``sms`` SMs (no autotuning).

    The weight read is everything, and an SM streams at its share of HBM bandwidth only with
    about 32 KB of loads in flight (bandwidth x latency: 4.8 TB/s x ~0.8 us over 132 SMs).

    - ``block_m``: 1 for one row, else 16 (``tl.dot`` needs M >= 16; rows past ``m`` are masked).
    - ``block_n``: the largest of 16, 32, 64 that still gives ``>= 2 * sms`` programs, so that
      each SM holds two (Llama-3-8B on 132 SMs: 16 for N = 4096 and 6144, 64 for 28672 and the
      LM head); larger tiles re-read the input rows fewer times.
    - One row: ``block_k`` makes a 8192-element ``W`` tile (16 KB in bf16; 64 elements, eight
      16-byte loads, per thread at 4 warps), and the loop prefetches the next tile while
      multiplying this one: two programs per SM keep up to 64 KB in flight. About 170-210
      registers per thread (sm_90), so two programs fit per SM. ``num_stages`` is unused.
    - 2..16 rows: ``tl.dot`` with Triton's cp.async pipeline, 4 stages (3 tiles ahead) of a
      ``W`` tile of ``max(64, 2048 // block_n)`` columns: 12 KB ahead per program at
      ``block_n`` 16, 24 KB at 64; larger ``block_k`` spills registers in the RMSNorm
      prologue (its ``[16, block_k]`` float32 tiles) at 4 warps.

    ``block_k`` is capped at ``next_pow2(k)`` (at least 16) for small ``k``. Raises ValueError
    unless ``1 <= m <= SKINNY_MAX_ROWS`` and ``n, k, sms >= 1``.
    """
    if not 1 <= m <= SKINNY_MAX_ROWS:
        raise ValueError(f"m must be in 1..{SKINNY_MAX_ROWS}, got {m}")
    if min(n, k, sms) < 1:
        raise ValueError(f"n, k and sms must be >= 1, got {n}, {k}, {sms}")
    block_n = 16
    for candidate in (32, 64):
        if _cdiv(n, candidate) >= 2 * sms:
            block_n = candidate
    cap = max(next_pow2(k), 16)
    if m == 1:
        return SkinnyConfig(1, block_n, min(8192 // block_n, cap), num_warps=4, num_stages=1)
    block_k = min(max(64, 2048 // block_n), cap)
    return SkinnyConfig(SKINNY_MAX_ROWS, block_n, block_k, num_warps=4, num_stages=4)


def _cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive ints (``triton.cdiv`` without needing Triton)."""
    return -(-a // b)


# ---------------------------------------------------------------- kernel


@jit
def _input_tile(
    x_ptr,  # [M, K] (PROLOGUE silu_mul: [M, 2 * K]), unit last stride
    residual_ptr,  # [M, K]; read only with the rms_norm prologue and HAS_RESIDUAL
    new_residual_ptr,  # [M, K], contiguous; rows < store_rows written with a residual
    norm_weight_ptr,  # [K]; read only with the rms_norm prologue
    rows,  # [BLOCK_M] row indices
    cols,  # [BLOCK_K] column indices into K
    M,
    K,
    x_stride,
    residual_stride,
    store_rows,  # M in the one program that writes the new residual, 0 in the others
    PROLOGUE: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
):
    """One [BLOCK_M, BLOCK_K] tile of the GEMM's input after the prologue, zeros past M and K.

    Returns float32 ``(a, h)``: ``a`` the tile the GEMM multiplies; ``h`` (rms_norm only,
    else ``a``) the rows ``x + residual`` rounded to x.dtype, as rms_norm_ref rounds them, so
    that the caller sums their squares (``a = h * norm_weight``: the row's 1/rms comes later).
    silu_mul rounds ``silu(gate) * up`` to x.dtype, as silu_and_mul_ref does.
    """
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    ptrs = x_ptr + rows[:, None] * x_stride + cols[None, :]
    if PROLOGUE == 1:
        x = tl.load(ptrs, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            r_ptrs = residual_ptr + rows[:, None] * residual_stride + cols[None, :]
            r = tl.load(r_ptrs, mask=mask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
            out_ptrs = new_residual_ptr + rows[:, None] * K + cols[None, :]
            tl.store(out_ptrs, x, mask=mask & (rows[:, None] < store_rows))
        h = x.to(tl.float32)
        weight = tl.load(norm_weight_ptr + cols, mask=cols < K, other=0.0).to(tl.float32)
        a = h * weight[None, :]
    elif PROLOGUE == 2:
        gate = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(ptrs + K, mask=mask, other=0.0).to(tl.float32)
        a = (gate * tl.sigmoid(gate) * up).to(x_ptr.dtype.element_ty).to(tl.float32)
        h = a
    else:
        a = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
        h = a
    return a, h


@jit
def _weight_tile(
    w_rows,  # [BLOCK_N, 1] pointers to rows of W
    mask_n,  # [BLOCK_N] rows < N
    cols,  # [BLOCK_K]
    K,
):
    """[BLOCK_N, BLOCK_K] of W in its dtype, zeros past N and K."""
    return tl.load(w_rows + cols[None, :], mask=mask_n[:, None] & (cols[None, :] < K), other=0.0)


@jit
def _skinny_gemm_kernel(
    x_ptr,  # [M, K] (PROLOGUE silu_mul: [M, 2 * K]), unit last stride
    residual_ptr,  # [M, K]; read only with the rms_norm prologue and HAS_RESIDUAL
    norm_weight_ptr,  # [K]; read only with the rms_norm prologue
    w_ptr,  # [N, K], unit last stride
    bias_ptr,  # [N]; read only when HAS_BIAS
    out_ptr,  # [M, N], contiguous
    new_residual_ptr,  # [M, K], contiguous; written by program 0 with a residual
    M,
    N,
    K,
    x_stride,
    residual_stride,
    w_stride,
    eps,
    PROLOGUE: tl.constexpr,  # 0 plain, 1 rms_norm, 2 silu_mul
    HAS_RESIDUAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,  # 1: CUDA cores; 16: tl.dot
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for float32 (no TF32), else the default
):
    """Grid (cdiv(N, BLOCK_N),): program p computes ``out[:, p*BLOCK_N : (p+1)*BLOCK_N]``."""
    pid = tl.program_id(0)
    rows = tl.arange(0, BLOCK_M)
    cols_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = cols_n < N
    w_rows = w_ptr + cols_n.to(tl.int64)[:, None] * w_stride
    store_rows = tl.where(pid == 0, M, 0)
    sum_sq = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)  # rms_norm only
    if BLOCK_M == 1:
        # Triton pipelines only loads that feed tl.dot, so the loop double-buffers by hand:
        # the next tile's loads are in flight while this tile's FMAs run.
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)  # summed over K after the loop
        cols = tl.arange(0, BLOCK_K)
        a, h = _input_tile(
            x_ptr, residual_ptr, new_residual_ptr, norm_weight_ptr, rows, cols, M, K,
            x_stride, residual_stride, store_rows, PROLOGUE, HAS_RESIDUAL,
        )  # fmt: skip
        w = _weight_tile(w_rows, mask_n, cols, K)
        for k0 in range(BLOCK_K, K + BLOCK_K, BLOCK_K):  # the last prefetch is masked off
            cols = k0 + tl.arange(0, BLOCK_K)
            a_next, h_next = _input_tile(
                x_ptr, residual_ptr, new_residual_ptr, norm_weight_ptr, rows, cols, M, K,
                x_stride, residual_stride, store_rows, PROLOGUE, HAS_RESIDUAL,
            )  # fmt: skip
            w_next = _weight_tile(w_rows, mask_n, cols, K)
            acc += w.to(tl.float32) * a  # [BLOCK_N, BLOCK_K] * [1, BLOCK_K]
            if PROLOGUE == 1:
                sum_sq += h * h
            a, h, w = a_next, h_next, w_next
        y = tl.sum(acc, axis=1)[None, :]
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            a, h = _input_tile(
                x_ptr, residual_ptr, new_residual_ptr, norm_weight_ptr, rows, cols, M, K,
                x_stride, residual_stride, store_rows, PROLOGUE, HAS_RESIDUAL,
            )  # fmt: skip
            w = _weight_tile(w_rows, mask_n, cols, K)
            acc = tl.dot(a.to(w.dtype), tl.trans(w), acc, input_precision=DOT_PRECISION)
            if PROLOGUE == 1:
                sum_sq += h * h
        y = acc
    if PROLOGUE == 1:
        y = y * tl.rsqrt(tl.sum(sum_sq, axis=1) / K + eps)[:, None]
    if HAS_BIAS:
        y += tl.load(bias_ptr + cols_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rows[:, None] * N + cols_n[None, :]
    tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=(rows[:, None] < M) & mask_n[None, :])


# ---------------------------------------------------------------- checked wrappers


def _check_weight(
    weight: object, bias: object, k: int, x: torch.Tensor, k_name: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Checks W [N, k] (x's dtype and device, unit last stride) and bias [N] or None."""
    check_tensor("weight", weight, ndim=2, dtypes=(x.dtype,), device=x.device)
    assert isinstance(weight, torch.Tensor)
    if weight.shape[1] != k:
        raise ValueError(
            f"weight must have {k} columns ({k_name}), got shape {tuple(weight.shape)}"
        )
    if weight.shape[0] < 1:
        raise ValueError(f"weight must have at least one row, got shape {tuple(weight.shape)}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=FLOAT_DTYPES, device=x.device)
        check_shape("bias", bias, (weight.shape[0],))
    return weight, bias


def _check_rows(name: str, x: object) -> torch.Tensor:
    """Checks a [M, K] input (M <= SKINNY_MAX_ROWS, K >= 1) on CUDA (or CPU when interpreting)."""
    check_tensor(name, x, ndim=2, dtypes=FLOAT_DTYPES)
    assert isinstance(x, torch.Tensor)
    check_device(name, x)
    if x.shape[0] > SKINNY_MAX_ROWS:
        raise ValueError(f"{name} must have at most {SKINNY_MAX_ROWS} rows, got {x.shape[0]}")
    if x.shape[1] < 1:
        raise ValueError(f"{name} must have at least one column, got shape {tuple(x.shape)}")
    return x


def _launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    prologue: int,
    config: SkinnyConfig | None,
    residual: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Allocates the output (and the new residual) and launches the kernel; shapes checked."""
    m, (n, k) = x.shape[0], weight.shape
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    new_residual = None if residual is None else torch.empty((m, k), dtype=x.dtype, device=x.device)
    if m == 0:
        return out, new_residual
    cfg = config or choose_skinny_config(m, n, k, num_sms(x.device))
    if cfg.block_m < m:
        raise ValueError(f"config: block_m {cfg.block_m} < {m} rows of x")
    _skinny_gemm_kernel[(triton.cdiv(n, cfg.block_n),)](
        x,
        x if residual is None else residual,
        weight if norm_weight is None else norm_weight,
        weight,
        weight if bias is None else bias,
        out,
        out if new_residual is None else new_residual,
        m,
        n,
        k,
        x.stride(0),
        0 if residual is None else residual.stride(0),
        weight.stride(0),
        eps,
        PROLOGUE=prologue,
        HAS_RESIDUAL=residual is not None,
        HAS_BIAS=bias is not None,
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out, new_residual


def skinny_linear(
    x: torch.Tensor,  # [M, K]
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None = None,  # [N]
    config: SkinnyConfig | None = None,
) -> torch.Tensor:
    """Triton twin of :func:`linear_ref` for ``M <= 16`` rows: ``x @ weight^T + bias``.

    ``x``: [M, K] fp16/bf16/fp32, unit last stride; ``weight``: [N, K] (an ``nn.Linear``
    weight) in x.dtype on x's device, unit last stride; ``bias``: [N] any float dtype, or None.
    Returns a new contiguous [M, N] in x.dtype, accumulated in float32. ``config`` overrides
    :func:`choose_skinny_config` (benchmarks). Raises ValueError naming a bad argument (or
    ``config``), RuntimeError without Triton.
    """
    _check_rows("x", x)
    weight, bias = _check_weight(weight, bias, x.shape[1], x, "x's K")
    return _launch(x, weight, bias, _PLAIN, config)[0]


def rms_norm_linear(
    x: torch.Tensor,  # [M, K]
    norm_weight: torch.Tensor,  # [K]
    eps: float,
    weight: torch.Tensor,  # [N, K]
    residual: torch.Tensor | None = None,  # [M, K]
    bias: torch.Tensor | None = None,  # [N]
    config: SkinnyConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`rms_norm_linear_ref`: a pre-norm and the projection after it in
    one launch (``input_layernorm`` + ``qkv_proj``, ``post_attention_layernorm`` +
    ``gate_up_proj``), the weight read once.

    ``x``: [M <= 16, K] fp16/bf16/fp32, unit last stride; ``residual``: like x, same dtype, or
    None; ``norm_weight``: [K] any float dtype; ``weight``, ``bias`` as in
    :func:`skinny_linear`. Returns ``(y, new_residual)``: y [M, N] in x.dtype; new_residual a
    new contiguous ``x + residual`` [M, K] (written once, by the first program), or ``x``
    itself when ``residual`` is None. See the module docstring for where rounding differs from
    the unfused pair. Raises ValueError naming a bad argument, RuntimeError without Triton.
    """
    _check_rows("x", x)
    k = x.shape[1]
    check_tensor("norm_weight", norm_weight, ndim=1, dtypes=FLOAT_DTYPES, device=x.device)
    check_shape("norm_weight", norm_weight, (k,))
    if residual is not None:
        check_tensor("residual", residual, ndim=2, dtypes=(x.dtype,), device=x.device)
        check_shape("residual", residual, tuple(x.shape))
    weight, bias = _check_weight(weight, bias, k, x, "x's K")
    out, new_residual = _launch(x, weight, bias, _RMS_NORM, config, residual, norm_weight, eps)
    return out, x if new_residual is None else new_residual


def silu_and_mul_linear(
    gate_up: torch.Tensor,  # [M, 2 * I]: [gate | up]
    weight: torch.Tensor,  # [N, I]
    bias: torch.Tensor | None = None,  # [N]
    config: SkinnyConfig | None = None,
) -> torch.Tensor:
    """Triton twin of :func:`silu_and_mul_linear_ref`: SwiGLU's gate and ``down_proj`` in one
    launch, the weight read once.

    ``gate_up``: [M <= 16, 2 * I] fp16/bf16/fp32, unit last stride; ``weight``: [N, I] in
    gate_up.dtype, unit last stride; ``bias`` as in :func:`skinny_linear`. Returns a new
    contiguous [M, N] in gate_up.dtype. Raises ValueError naming a bad argument, RuntimeError
    without Triton.
    """
    _check_rows("gate_up", gate_up)
    if gate_up.shape[1] % 2:
        raise ValueError(f"gate_up: last dim must be even ([gate | up]), got {gate_up.shape[1]}")
    weight, bias = _check_weight(weight, bias, gate_up.shape[1] // 2, gate_up, "half gate_up's")
    return _launch(gate_up, weight, bias, _SILU_MUL, config)[0]
