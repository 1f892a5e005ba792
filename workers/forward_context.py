"""The per-step context set around a forward pass (STYLE.md 6): layers read it, nobody threads it."""

from __future__ import annotations

import contextlib
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


_current: ForwardContext | None = None


@contextlib.contextmanager
def set_forward_context(ctx: ForwardContext) -> Iterator[None]:
    global _current
    prev, _current = _current, ctx
    try:
        yield
    finally:
        _current = prev


def get_forward_context() -> ForwardContext:
    """Raises RuntimeError outside ``set_forward_context``."""
    if _current is None:
        raise RuntimeError("no forward context: call the model inside set_forward_context()")
    return _current
