"""RMSNorm with an optional fused residual add."""

from __future__ import annotations

import torch

from kernels._triton import (
    FLOAT_DTYPES,
    check_device,
    check_shape,
    check_tensor,
    jit,
    next_pow2,
    tl,
)


def rms_norm_ref(
    x: torch.Tensor,  # [num_tokens, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
    residual: torch.Tensor | None = None,  # [num_tokens, hidden]
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm (Zhang & Sennrich 2019) of ``x + residual``, computed in float32.

    Returns ``(normed, new_residual)`` where ``new_residual = x + residual`` (or ``x`` when
    ``residual`` is None), both in ``x.dtype``. This is the pre-norm pattern of Llama: the sum
    is carried to the next layer as the residual stream.
    """
    summed = x if residual is None else x + residual
    h = summed.float()
    normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (normed * weight.float()).to(x.dtype), summed


@jit
def _rms_norm_kernel(
    x_ptr,  # [num_tokens, hidden]
    residual_ptr,  # [num_tokens, hidden]; unused when HAS_RESIDUAL is False
    weight_ptr,  # [hidden]
    out_ptr,  # [num_tokens, hidden], contiguous
    new_residual_ptr,  # [num_tokens, hidden], contiguous; unused when HAS_RESIDUAL is False
    hidden,
    x_stride,
    residual_stride,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program per token: the whole row sits in registers (BLOCK >= hidden)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * residual_stride + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(new_residual_ptr + row * hidden + cols, x, mask=mask)
    h = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(h * h, axis=0) / hidden + eps)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(
        out_ptr + row * hidden + cols, (h * inv_rms * w).to(out_ptr.dtype.element_ty), mask=mask
    )


def rms_norm(
    x: torch.Tensor,  # [num_tokens, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
    residual: torch.Tensor | None = None,  # [num_tokens, hidden]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`rms_norm_ref`: fused ``x + residual`` and RMSNorm, fp32 accumulation.

    ``x`` and ``residual`` share a dtype (fp16, bf16 or fp32) and need a unit stride in their
    last dim; ``weight`` may be any of those dtypes. Returns ``(normed, new_residual)``, new
    contiguous tensors in x.dtype (``new_residual`` is ``x`` itself when ``residual`` is None,
    as in the reference). Rows up to 65536 wide. Raises ValueError naming a bad argument,
    RuntimeError without Triton.
    """
    device = check_device("x", x)
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES)
    num_tokens, hidden = x.shape
    check_tensor("weight", weight, ndim=1, dtypes=FLOAT_DTYPES, device=device)
    check_shape("weight", weight, (hidden,))
    if residual is not None:
        check_tensor("residual", residual, ndim=2, dtypes=(x.dtype,), device=device)
        check_shape("residual", residual, tuple(x.shape))
    if not 0 < hidden <= 65536:
        raise ValueError(f"x: hidden size must be in 1..65536, got {hidden}")
    out = torch.empty((num_tokens, hidden), dtype=x.dtype, device=device)
    new_residual = x if residual is None else torch.empty_like(out)
    if num_tokens == 0:
        return out, new_residual
    block = next_pow2(hidden)
    _rms_norm_kernel[(num_tokens,)](
        x,
        x if residual is None else residual,
        weight,
        out,
        new_residual,
        hidden,
        x.stride(0),
        x.stride(0) if residual is None else residual.stride(0),
        eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK=block,
        num_warps=min(max(block // 512, 1), 16),
    )
    return out, new_residual
