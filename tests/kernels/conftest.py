"""Kernel tests run on the GPU when there is one, else on CPU through Triton's interpreter.

``TRITON_INTERPRET`` must be set before the kernel modules are imported (``triton.jit``
reads it when it decorates), so it is set here, before any test module loads.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

try:
    import triton  # noqa: F401
except ImportError:
    triton = None


def _patch_interpreter_bf16_dot() -> None:
    """Triton's interpreter (3.9) multiplies bf16 operands of ``tl.dot`` as their raw uint16
    bits; widen them to float32 first, as the GPU's tensor cores effectively do."""
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    original = builder.create_dot

    def widen(handle: object) -> object:
        if handle.dtype.scalar != interpreter.tl.bfloat16:
            return handle
        bits = handle.data.astype(np.uint32) << 16
        return interpreter.TensorHandle(bits.view(np.float32), interpreter.tl.float32)

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):  # noqa: ANN001
        return original(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    builder.create_dot = create_dot


if triton is not None and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    _patch_interpreter_bf16_dot()


@pytest.fixture
def device() -> torch.device:
    """CUDA when available, else CPU (kernels then run in Triton's interpreter)."""
    if triton is None:
        pytest.skip("triton is not installed")
    return torch.device("cuda" if HAS_CUDA else "cpu")
