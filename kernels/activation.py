"""SwiGLU's gate: SiLU(gate) * up."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._triton import FLOAT_DTYPES, check_device, check_tensor, jit, next_pow2, tl, triton


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """``x``: [num_tokens, 2 * d] holding ``[gate | up]``; returns [num_tokens, d] in x.dtype.

    SwiGLU (Shazeer 2020, "GLU Variants Improve Transformer"), as in Llama's MLP.
    """
    d = x.shape[-1] // 2
    return (F.silu(x[..., :d].float()) * x[..., d:].float()).to(x.dtype)


@jit
def _silu_and_mul_kernel(
    x_ptr,  # [num_tokens, 2 * d]: [gate | up]
    out_ptr,  # [num_tokens, d], contiguous
    d,
    x_stride,
    BLOCK: tl.constexpr,
):
    """Grid (num_tokens, cdiv(d, BLOCK)); silu(g) = g * sigmoid(g), in float32."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * x_stride + d + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + row * d + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """Triton twin of :func:`silu_and_mul_ref`.

    ``x``: [num_tokens, 2 * d] fp16/bf16/fp32 with a unit last stride; returns a new contiguous
    [num_tokens, d] in x.dtype. Raises ValueError naming a bad argument, RuntimeError without
    Triton.
    """
    device = check_device("x", x)
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES)
    num_tokens, two_d = x.shape
    if two_d % 2:
        raise ValueError(f"x: last dim must be even ([gate | up]), got {two_d}")
    d = two_d // 2
    out = torch.empty((num_tokens, d), dtype=x.dtype, device=device)
    if out.numel() == 0:
        return out
    block = min(next_pow2(d), 1024)
    grid = (num_tokens, triton.cdiv(d, block))
    _silu_and_mul_kernel[grid](x, out, d, x.stride(0), BLOCK=block, num_warps=4)
    return out
