"""The per-step context set around a forward pass (STYLE.md 6): layers read it, nobody threads it."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from attention.metadata import AttentionMetadata


@dataclass
class ForwardContext:
    attn_metadata: AttentionMetadata
    kv_cache: torch.Tensor  # [num_blocks, layers_per_block, 2, block_size, num_kv_heads, head_dim]
    router: Any = None
    """A pipeline step with pre-drop requests: their attention goes through this
    (workers/remote_attention.py ``RemoteAttention``); None in every other step."""


_local = threading.local()
"""Per thread: stages of one pipeline may run in threads of one process (tests)."""


@contextlib.contextmanager
def set_forward_context(ctx: ForwardContext) -> Iterator[None]:
    prev = getattr(_local, "current", None)
    _local.current = ctx
    try:
        yield
    finally:
        _local.current = prev


def get_forward_context() -> ForwardContext:
    """Raises RuntimeError outside ``set_forward_context``."""
    ctx = getattr(_local, "current", None)
    if ctx is None:
        raise RuntimeError("no forward context: call the model inside set_forward_context()")
    return ctx
