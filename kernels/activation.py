"""SwiGLU's gate: SiLU(gate) * up."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """``x``: [num_tokens, 2 * d] holding ``[gate | up]``; returns [num_tokens, d] in x.dtype.

    SwiGLU (Shazeer 2020, "GLU Variants Improve Transformer"), as in Llama's MLP.
    """
    d = x.shape[-1] // 2
    return (F.silu(x[..., :d].float()) * x[..., d:].float()).to(x.dtype)
