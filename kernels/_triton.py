"""Guarded Triton import and the argument checks shared by the kernel wrappers.

Importing this module never fails: where Triton is absent, ``HAS_TRITON`` is False, ``jit``
leaves functions undecorated and every wrapper raises at call time, so the torch references
beside the kernels stay usable. With ``TRITON_INTERPRET=1`` (set before the first import of a
kernel module) the kernels run on CPU tensors through Triton's interpreter, which is how the
CPU tests run them.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch references stay importable without Triton
    triton = None
    tl = None

HAS_TRITON = triton is not None

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


def jit(fn: Callable[..., Any] | None = None, **kwargs: Any) -> Any:
    """``triton.jit`` where Triton is installed; the undecorated function otherwise. Takes
    ``triton.jit``'s keywords as ``@jit(do_not_specialize=[...])``."""
    if fn is None:
        return functools.partial(jit, **kwargs)
    return triton.jit(fn, **kwargs) if HAS_TRITON else fn


def require_triton() -> None:
    """Raises RuntimeError when Triton is not installed."""
    if not HAS_TRITON:
        raise RuntimeError("Triton is not installed; use the *_ref torch functions instead")


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(n - 1, 0).bit_length()


@functools.lru_cache(maxsize=16)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors on ``device``; 132 (an H100/H200) off CUDA."""
    if device.type != "cuda":
        return 132
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def check_tensor(
    name: str,
    t: object,
    *,
    ndim: int,
    dtypes: tuple[torch.dtype, ...],
    device: torch.device | None = None,
    contiguous: bool = False,
) -> torch.Tensor:
    """Checks one argument; raises ValueError naming it. Always requires a unit last stride."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} dtype must be one of {dtypes}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    if t.numel() > 0 and t.stride(-1) != 1:
        raise ValueError(f"{name} must have a unit stride in its last dim, got {t.stride()}")
    return t


def check_device(name: str, t: torch.Tensor) -> torch.device:
    """Returns ``t.device``; raises ValueError unless it is CUDA (or CPU under the interpreter)."""
    require_triton()
    if t.device.type == "cuda" or (t.device.type == "cpu" and interpreting()):
        return t.device
    raise ValueError(f"{name} must be on a CUDA device, got {t.device}")


def check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    """Raises ValueError naming ``t`` unless its shape is ``shape``."""
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def check_kv_cache(kv_cache: object, layer: int, device: torch.device) -> torch.Tensor:
    """Checks a paged KV cache and a layer index into it; raises ValueError naming the bad one.

    ``kv_cache``: contiguous [num_blocks, layers_per_block, 2, block_size, num_kv_heads,
    head_dim] fp16/bf16/fp32 on ``device``; ``0 <= layer < layers_per_block``.
    """
    check_tensor("kv_cache", kv_cache, ndim=6, dtypes=FLOAT_DTYPES, device=device, contiguous=True)
    assert isinstance(kv_cache, torch.Tensor)
    if kv_cache.shape[2] != 2:
        raise ValueError(f"kv_cache dim 2 must be 2 (K, V), got shape {tuple(kv_cache.shape)}")
    if not 0 <= layer < kv_cache.shape[1]:
        raise ValueError(f"layer must be in [0, {kv_cache.shape[1]}), got {layer}")
    return kv_cache
