"""One worker's KV memory as one flat byte buffer, viewed as blocks of any layer count.

KunServe's layout (DESIGN.md §5, reference/kunserve.md §3(a)): a block holds every layer the
worker computes, ``[num_blocks, layers_per_block, 2, block_size, num_kv_heads, head_dim]``. In
normal mode ``layers_per_block = L``; after a drop a stage views the same bytes, grown by its
freed weight bytes, with ``layers_per_block = L_r``. On CPU, growing or shrinking allocates a
new buffer and copies the kept prefix; the VMM pool (kernels/vmm.py) will map and unmap chunks
at the end of a fixed virtual range instead, with the same contract: the prefix is kept.
"""

from __future__ import annotations

import torch


class KVBuffer:
    """A flat ``uint8`` buffer of ``nbytes`` on one device, and typed block views of it.

    ``block_shape`` is ``(block_size, num_kv_heads, head_dim)``; a block of ``layers`` layers
    takes ``layers * 2 * block_size * num_kv_heads * head_dim * dtype.itemsize`` bytes.
    """

    def __init__(
        self,
        nbytes: int,
        block_shape: tuple[int, int, int],
        dtype: torch.dtype,
        device: torch.device,
        data: torch.Tensor | None = None,
    ) -> None:
        if nbytes < 0:
            raise ValueError(f"nbytes must be >= 0, got {nbytes}")
        self.block_shape = block_shape
        self.dtype = dtype
        self.device = device
        self._data = torch.zeros(nbytes, dtype=torch.uint8, device=device) if data is None else data

    @classmethod
    def adopt(cls, kv_cache: torch.Tensor) -> KVBuffer:
        """Wraps an existing contiguous cache ``[N, L, 2, bs, H, D]`` without copying."""
        if not kv_cache.is_contiguous() or kv_cache.dim() != 6:
            raise ValueError("adopt needs a contiguous [N, L, 2, bs, H, D] KV cache")
        flat = kv_cache.view(-1).view(torch.uint8)
        shape = tuple(kv_cache.shape[3:])
        return cls(flat.numel(), shape, kv_cache.dtype, kv_cache.device, data=flat)

    @property
    def nbytes(self) -> int:
        return self._data.numel()

    def block_bytes(self, layers: int) -> int:
        """Bytes of one block holding ``layers`` layers (K and V)."""
        bs, h, d = self.block_shape
        return layers * 2 * bs * h * d * self.dtype.itemsize

    def num_blocks(self, layers: int) -> int:
        """Whole blocks of ``layers`` layers that fit: floor(nbytes / block_bytes)."""
        return self.nbytes // self.block_bytes(layers)

    def view(self, layers: int) -> torch.Tensor:
        """[num_blocks(layers), layers, 2, block_size, num_kv_heads, head_dim] over the buffer's
        prefix (no copy; bytes past the last whole block are not part of the view)."""
        n = self.num_blocks(layers)
        used = self._data[: n * self.block_bytes(layers)]
        return used.view(self.dtype).view(n, layers, 2, *self.block_shape)

    def resize(self, nbytes: int) -> None:
        """Grows or shrinks to ``nbytes``, keeping the first ``min(old, new)`` bytes; new bytes
        are zero. Views taken before are stale afterwards."""
        if nbytes == self.nbytes:
            return
        new = torch.zeros(nbytes, dtype=torch.uint8, device=self.device)
        keep = min(nbytes, self.nbytes)
        new[:keep].copy_(self._data[:keep])
        self._data = new
