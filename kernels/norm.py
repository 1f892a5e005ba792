"""RMSNorm with an optional fused residual add."""

from __future__ import annotations

import torch


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
