"""A worker's memory across a drop and a restore: weights out, KV in, and back.

KunServe §3(a), §3(d) (reference/kunserve.md); DESIGN.md §5-6. The transition steps
(workers/transition.py) see one interface, :class:`StageMemory`, whatever holds the bytes:

- :class:`TorchStageMemory`: the torch allocator (``--memory-backend torch``, and CPU tests):
  a drop lets the dropped modules be freed and grows the flat KV buffer by their bytes
  (:class:`~workers.kv_buffer.KVBuffer`: allocate and copy the kept prefix); a restore shrinks
  it back and copies the dropped modules from the stages that kept them.

The KV bytes are one flat buffer viewed as blocks of any layer count (``view(layers)``); a drop
and a restore keep its prefix, so blocks that pre-drop requests hold in the L-layer view keep
their bytes (DESIGN.md §5: blocks keep their format until their KV has moved).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import torch

from attention.transport import StageTransport
from workers.kv_buffer import KVBuffer
from workers.models.llama import LlamaModel
from workers.pipeline import build_stage_model, dropped_param_bytes, restore_full_model


class StageMemory(Protocol):
    """What a transition needs of a worker's memory (one instance per worker, made at its
    first drop and kept, so ``normal_bytes`` is the KV size of normal mode)."""

    normal_bytes: int
    """KV bytes in normal mode (before the first drop)."""

    @property
    def nbytes(self) -> int:
        """KV bytes usable now."""

    def block_bytes(self, layers: int) -> int:
        """Bytes of one KV block of ``layers`` layers."""

    def view(self, layers: int) -> torch.Tensor:
        """``[num_blocks, layers, 2, block_size, num_kv_heads, head_dim]`` over the KV bytes'
        prefix (no copy)."""

    def bytes_after_drop(self, model: LlamaModel, layer_range: tuple[int, int]) -> int:
        """KV bytes :meth:`drop` would leave usable (changes nothing)."""

    def drop(self, model: LlamaModel, layer_range: tuple[int, int]) -> LlamaModel:
        """Keeps ``layer_range`` of ``model`` (no reload, no copy), hands the rest's memory to
        the KV bytes (prefix kept). Returns the stage model; ``model`` must not be used again."""

    def restore(
        self,
        model: LlamaModel,
        ranks: Sequence[int],
        ranges: Sequence[tuple[int, int]],
        stage: int,
        transport: StageTransport,
    ) -> LlamaModel:
        """Every stage of the group at once: shrinks the KV bytes back to ``normal_bytes``
        (prefix kept; the caller has moved live KV out of the rest) and rebuilds the full model
        from this stage's modules and the other stages' (KunServe §3(d): from the peer that kept
        them). Returns the full model."""


class TorchStageMemory:
    """:class:`StageMemory` over the torch allocator: the runner's KV cache, adopted as a
    :class:`KVBuffer`."""

    def __init__(self, kv_cache: torch.Tensor) -> None:
        self.buffer = KVBuffer.adopt(kv_cache)
        self.normal_bytes = self.buffer.nbytes

    @property
    def nbytes(self) -> int:
        return self.buffer.nbytes

    def block_bytes(self, layers: int) -> int:
        return self.buffer.block_bytes(layers)

    def view(self, layers: int) -> torch.Tensor:
        return self.buffer.view(layers)

    def bytes_after_drop(self, model: LlamaModel, layer_range: tuple[int, int]) -> int:
        return self.buffer.nbytes + dropped_param_bytes(model, layer_range)

    def drop(self, model: LlamaModel, layer_range: tuple[int, int]) -> LlamaModel:
        stage, freed = build_stage_model(model, layer_range)
        self.buffer.resize(self.buffer.nbytes + freed)
        return stage

    def restore(
        self,
        model: LlamaModel,
        ranks: Sequence[int],
        ranges: Sequence[tuple[int, int]],
        stage: int,
        transport: StageTransport,
    ) -> LlamaModel:
        self.buffer.resize(self.normal_bytes)
        return restore_full_model(model, ranks, ranges, stage, transport)


def stage_memory_for(runner: Any) -> StageMemory:
    """The :class:`StageMemory` of a ModelRunner in normal mode: VMM when ``runner.memory``
    is set (not supported yet: raises NotImplementedError), else the torch allocator's."""
    if runner.memory is not None:
        raise NotImplementedError("drop and restore over VMM memory are not implemented yet")
    return TorchStageMemory(runner.kv_cache)
