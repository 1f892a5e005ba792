"""Copies of equal-length contiguous runs between KV block views: the live KV exchange's
gathers, scatters and local copies (workers/kv_exchange.py).

A KV block view is a contiguous ``[num_blocks, layers, 2, block_size, num_kv_heads, head_dim]``
tensor (any trailing dims work), so layers ``[a, b)`` of one block are ONE contiguous run of
``(b - a) * view.stride(1)`` elements starting at element ``block * view.stride(0) +
a * view.stride(1)``. An exchange slice copy moves such a run per block, from a list of source
blocks in one view to a list of destination blocks in another (possibly of the same buffer,
shaped differently, e.g. ``[2 * B, L // 2, ...]`` over ``[B, L, ...]``).

:func:`copy_runs` is the primitive: run ``i`` of ``run_len`` elements at element offset
``src_starts[i]`` of ``src`` goes to element offset ``dst_starts[i]`` of ``dst``. One Triton
program copies one tile of ``TILE_BYTES`` bytes of one run (grid: runs x tiles of a run) with
masked 16-byte vector loads and stores wherever the run's start, end and both base pointers
allow it, int64 offsets throughout, as raw bits (the dtype only sets the element size). The
wrappers :func:`copy_block_slices` (view to view, no scratch), :func:`gather_block_slices`
(view to a new contiguous ``[n, b - a, ...]`` tensor, e.g. a send buffer) and
:func:`scatter_block_slices` (the reverse) compute the run starts on the device from the block
ids: no host sync.

Runs must not overlap each other nor any source run a destination run (the result is undefined
otherwise: tiles run in any order). Run starts and block ids are NOT bounds-checked on the
device (that would need a host sync): out-of-range ones read or write outside the tensors.

Where the kernel runs: on CUDA tensors, and on CPU tensors under Triton's interpreter
(``TRITON_INTERPRET=1``, as the CPU tests set), i.e. wherever
:func:`kernels._triton.check_device` accepts a tensor. Elsewhere (CPU serving without the
interpreter, or no Triton installed) the same functions fall back to plain torch indexing, so
gloo workers need no interpreter. Results are bit-identical either way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kernels._triton import HAS_TRITON, interpreting, jit, tl

TILE_BYTES = 16384
"""Bytes of one run that one program copies (8192 bf16 elements: a 64 KiB one-layer slice of a
[.., 2, 16, 8, 128] bf16 block takes 4 programs, a 16-layer 1 MiB slice 64)."""

MAX_TILES_PER_RUN = 65535
"""CUDA's limit on the grid's second dim: runs up to ``65535 * TILE_BYTES`` (~1 GiB)."""

_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
"""Integer dtype of each element size: the kernel copies bits, never values."""


@jit(do_not_specialize=["src_stride", "src_base", "dst_stride", "dst_base", "run_vecs"])
def _copy_runs_kernel(
    src_ptr,  # any tensor's data, as integers of the element size
    dst_ptr,  # same element type as src_ptr
    src_idx_ptr,  # [n] int64; read only if SRC_INDEXED
    dst_idx_ptr,  # [n] int64; read only if DST_INDEXED
    src_stride,  # run i starts at src_idx[i] * src_stride + src_base (i * src_stride + ...
    src_base,  # ... without SRC_INDEXED), in elements
    dst_stride,
    dst_base,
    run_vecs,  # run_len // VEC
    SRC_INDEXED: tl.constexpr,
    DST_INDEXED: tl.constexpr,
    VEC: tl.constexpr,  # elements per 16-byte vector that divide run_len (1, 2, 4, 8 or 16)
    BLOCK: tl.constexpr,  # elements per program
):
    """Grid (n, cdiv(run_len, BLOCK)): program (i, j) copies elements [j * BLOCK, (j + 1) *
    BLOCK) of run i, masked at the run's end."""
    run = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    if SRC_INDEXED:
        s = tl.load(src_idx_ptr + run) * src_stride + src_base
    else:
        s = run * src_stride + src_base
    if DST_INDEXED:
        d = tl.load(dst_idx_ptr + run) * dst_stride + dst_base
    else:
        d = run * dst_stride + dst_base
    run_len = run_vecs * VEC  # provably a multiple of VEC: masks constant per vector
    mask = offs < run_len
    if (s % VEC == 0) & (d % VEC == 0):
        # (x // VEC) * VEC == x here; written so that the compiler sees the multiple of VEC
        # and emits vector loads and stores
        s = (s // VEC) * VEC
        d = (d // VEC) * VEC
        tl.store(dst_ptr + d + offs, tl.load(src_ptr + s + offs, mask=mask), mask=mask)
    else:
        tl.store(dst_ptr + d + offs, tl.load(src_ptr + s + offs, mask=mask), mask=mask)


def _use_kernel(device: torch.device) -> bool:
    """Where the Triton kernel runs: CUDA, or CPU under the interpreter (check_device's rule)."""
    return HAS_TRITON and (device.type == "cuda" or (device.type == "cpu" and interpreting()))


def _launch(
    src: torch.Tensor,
    dst: torch.Tensor,
    n: int,
    run_len: int,
    src_idx: torch.Tensor | None,
    src_stride: int,
    src_base: int,
    dst_idx: torch.Tensor | None,
    dst_stride: int,
    dst_base: int,
) -> None:
    """One kernel launch copying ``n`` runs of ``run_len`` elements (both > 0)."""
    size = src.element_size()
    bits = _BITS[size]
    block = TILE_BYTES // size
    tiles = -(-run_len // block)
    if tiles > MAX_TILES_PER_RUN:
        raise ValueError(
            f"run_len must be at most {MAX_TILES_PER_RUN * block} elements, got {run_len}"
        )
    vec = 16 // size
    while run_len % vec:
        vec //= 2
    _copy_runs_kernel[(n, tiles)](
        src.view(bits),
        dst.view(bits),
        src if src_idx is None else src_idx,
        dst if dst_idx is None else dst_idx,
        src_stride,
        src_base,
        dst_stride,
        dst_base,
        run_len // vec,
        SRC_INDEXED=src_idx is not None,
        DST_INDEXED=dst_idx is not None,
        VEC=vec,
        BLOCK=block,
        num_warps=8,
    )


def _check_pair(src_name: str, src: object, dst_name: str, dst: object) -> None:
    for name, t in ((src_name, src), (dst_name, dst)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    assert isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor)
    if dst.dtype != src.dtype:
        raise ValueError(f"{dst_name} dtype {dst.dtype} differs from {src_name}'s {src.dtype}")
    if dst.device != src.device:
        raise ValueError(f"{dst_name} is on {dst.device}, {src_name} on {src.device}")
    _check_element_size(src_name, src)


def _check_element_size(name: str, t: torch.Tensor) -> None:
    if t.element_size() not in _BITS:
        raise ValueError(f"{name}: unsupported element size {t.element_size()} bytes")


def _check_index(name: str, t: object, device: torch.device) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(t.shape)}")
    if t.dtype != torch.int64:
        raise ValueError(f"{name} must be int64, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")
    return t.contiguous()


def _check_view(name: str, view: object) -> torch.Tensor:
    if not isinstance(view, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(view).__name__}")
    if view.dim() < 2:
        raise ValueError(f"{name} must be [blocks, layers, ...], got shape {tuple(view.shape)}")
    if not view.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    return view


def _check_layers(name: str, layers: object, view_name: str, view: torch.Tensor) -> int:
    """Checks ``0 <= a <= b <= view.shape[1]``; returns ``b - a``."""
    if (
        not isinstance(layers, Sequence)
        or len(layers) != 2
        or not all(isinstance(x, int) for x in layers)
    ):
        raise ValueError(f"{name} must be a pair of ints (first, end), got {layers!r}")
    a, b = layers
    if not 0 <= a <= b <= view.shape[1]:
        raise ValueError(
            f"{name} {tuple(layers)} out of bounds for {view_name}'s {view.shape[1]} layers"
        )
    return b - a


def _check_slices(
    src_view: object,
    src_blocks: object,
    src_layers: object,
    dst_view: object,
    dst_blocks: object,
    dst_layers: object,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    src_view = _check_view("src_view", src_view)
    dst_view = _check_view("dst_view", dst_view)
    _check_pair("src_view", src_view, "dst_view", dst_view)
    if src_view.shape[2:] != dst_view.shape[2:]:
        raise ValueError(
            f"src_view {tuple(src_view.shape)} and dst_view {tuple(dst_view.shape)} differ "
            "past their first two dims"
        )
    src_blocks = _check_index("src_blocks", src_blocks, src_view.device)
    dst_blocks = _check_index("dst_blocks", dst_blocks, src_view.device)
    if len(src_blocks) != len(dst_blocks):
        raise ValueError(
            f"src_blocks has {len(src_blocks)} ids but dst_blocks has {len(dst_blocks)}"
        )
    ns = _check_layers("src_layers", src_layers, "src_view", src_view)
    nd = _check_layers("dst_layers", dst_layers, "dst_view", dst_view)
    if ns != nd:
        raise ValueError(
            f"src_layers {tuple(src_layers)} and dst_layers {tuple(dst_layers)} differ in length"
        )
    return src_view, src_blocks, dst_view, dst_blocks


def _flat(t: torch.Tensor) -> torch.Tensor:
    """1-D view of ``t``'s storage from its first element to the storage's end."""
    n = t.untyped_storage().nbytes() // t.element_size() - t.storage_offset()
    return t.as_strided((n,), (1,))


def copy_runs(
    src: torch.Tensor,  # any tensor whose storage holds the source runs (a block view)
    src_starts: torch.Tensor,  # [n] int64, element offset of each run in src
    dst: torch.Tensor,  # tensor holding the destination runs, same dtype and device as src
    dst_starts: torch.Tensor,  # [n] int64, element offset of each run in dst
    run_len: int,  # elements per run (all runs the same length)
) -> None:
    """Copies ``dst[dst_starts[i] : + run_len] = src[src_starts[i] : + run_len]`` for each i,
    offsets in elements of ``src.dtype`` from each tensor's first element (its ``data_ptr``),
    whatever its shape and strides.

    ``src`` and ``dst``: any dtype of 1, 2, 4 or 8 bytes (copied bit for bit), the same dtype
    and device; they may be views of one buffer. ``src_starts`` and ``dst_starts``: 1-D int64
    of one length ``n`` on that device. ``run_len >= 0``; ``n == 0`` or ``run_len == 0`` is a
    no-op. Runs must lie inside the storages (not checked on the device) and no destination run
    may overlap another run, source or destination (undefined otherwise). Asynchronous on CUDA
    (the current stream). Raises ValueError naming a bad argument.
    """
    _check_pair("src", src, "dst", dst)
    src_starts = _check_index("src_starts", src_starts, src.device)
    dst_starts = _check_index("dst_starts", dst_starts, src.device)
    if len(src_starts) != len(dst_starts):
        raise ValueError(
            f"src_starts has {len(src_starts)} runs but dst_starts has {len(dst_starts)}"
        )
    if isinstance(run_len, bool) or not isinstance(run_len, int) or run_len < 0:
        raise ValueError(f"run_len must be an int >= 0, got {run_len!r}")
    n = len(src_starts)
    if n == 0 or run_len == 0:
        return
    if _use_kernel(src.device):
        _launch(src, dst, n, run_len, src_starts, 1, 0, dst_starts, 1, 0)
        return
    # one int64 index per element: fine for the CPU serving this fallback is for
    within = torch.arange(run_len, device=src.device)
    src_idx = (src_starts[:, None] + within).view(-1)
    dst_idx = (dst_starts[:, None] + within).view(-1)
    _flat(dst)[dst_idx] = _flat(src)[src_idx]


def copy_block_slices(
    src_view: torch.Tensor,  # [Bs, Ls, ...] contiguous block view
    src_blocks: torch.Tensor,  # [n] int64 block ids into src_view
    src_layers: tuple[int, int],
    dst_view: torch.Tensor,  # [Bd, Ld, ...] contiguous block view, same trailing dims
    dst_blocks: torch.Tensor,  # [n] int64 block ids into dst_view
    dst_layers: tuple[int, int],
) -> None:
    """``dst_view[dst_blocks[i], x:y] = src_view[src_blocks[i], a:b]`` for each i, where
    ``(a, b) = src_layers`` and ``(x, y) = dst_layers``: one run of ``(b - a) *
    src_view.stride(1)`` elements per block, copied directly (no scratch tensor, no host sync).

    The views: contiguous, at least 2-D ([blocks, layers, ...]), the same dtype, device and
    dims past the first two (e.g. [B, L, 2, block_size, H, D] and [2B, L/2, 2, block_size, H,
    D] over one buffer). Block ids: 1-D int64 on the views' device, one length ``n``, in
    range (not checked on the device); ``n == 0`` is a no-op. Layer ranges: ``0 <= a <= b <=
    Ls``, ``0 <= x <= y <= Ld``, ``y - x == b - a``. The source and destination slices must not
    overlap (undefined otherwise). Raises ValueError naming a bad argument.
    """
    src_view, src_blocks, dst_view, dst_blocks = _check_slices(
        src_view, src_blocks, src_layers, dst_view, dst_blocks, dst_layers
    )
    (a, b), (x, y) = src_layers, dst_layers
    n, run_len = len(src_blocks), (b - a) * src_view.stride(1)
    if n == 0 or run_len == 0:
        return
    if _use_kernel(src_view.device):
        _launch(
            src_view, dst_view, n, run_len,
            src_blocks, src_view.stride(0), a * src_view.stride(1),
            dst_blocks, dst_view.stride(0), x * dst_view.stride(1),
        )  # fmt: skip
        return
    dst_view[dst_blocks, x:y] = src_view[:, a:b].index_select(0, src_blocks)


def gather_block_slices(
    src_view: torch.Tensor,  # [Bs, Ls, ...] contiguous block view
    src_blocks: torch.Tensor,  # [n] int64 block ids into src_view
    src_layers: tuple[int, int],
) -> torch.Tensor:
    """``src_view[src_blocks, a:b]`` as a new contiguous [n, b - a, ...] tensor (src_view's
    dtype and device), e.g. a send buffer. Arguments as in :func:`copy_block_slices`."""
    src_view = _check_view("src_view", src_view)
    _check_element_size("src_view", src_view)
    src_blocks = _check_index("src_blocks", src_blocks, src_view.device)
    layers = _check_layers("src_layers", src_layers, "src_view", src_view)
    a = src_layers[0]
    n, trailing = len(src_blocks), tuple(src_view.shape[2:])
    if not _use_kernel(src_view.device):
        return src_view[:, a : a + layers].index_select(0, src_blocks)
    out = torch.empty((n, layers, *trailing), dtype=src_view.dtype, device=src_view.device)
    run_len = out[0].numel() if n else 0
    if n and run_len:
        _launch(
            src_view, out, n, run_len,
            src_blocks, src_view.stride(0), a * src_view.stride(1),
            None, run_len, 0,
        )  # fmt: skip
    return out


def scatter_block_slices(
    data: torch.Tensor,  # [n, y - x, ...] contiguous
    dst_view: torch.Tensor,  # [Bd, Ld, ...] contiguous block view
    dst_blocks: torch.Tensor,  # [n] int64 block ids into dst_view
    dst_layers: tuple[int, int],
) -> None:
    """``dst_view[dst_blocks, x:y] = data``, where ``(x, y) = dst_layers``: the reverse of
    :func:`gather_block_slices`. ``data``: contiguous, dst_view's dtype and device, shape
    ``[len(dst_blocks), y - x, *dst_view.shape[2:]]``. Other arguments as in
    :func:`copy_block_slices`; ``data`` must not overlap the destination slices."""
    dst_view = _check_view("dst_view", dst_view)
    if not isinstance(data, torch.Tensor):
        raise ValueError(f"data must be a torch.Tensor, got {type(data).__name__}")
    _check_pair("data", data, "dst_view", dst_view)
    if not data.is_contiguous():
        raise ValueError("data must be contiguous")
    dst_blocks = _check_index("dst_blocks", dst_blocks, dst_view.device)
    layers = _check_layers("dst_layers", dst_layers, "dst_view", dst_view)
    x = dst_layers[0]
    n = len(dst_blocks)
    shape = (n, layers, *dst_view.shape[2:])
    if tuple(data.shape) != shape:
        raise ValueError(f"data must have shape {shape}, got {tuple(data.shape)}")
    run_len = data[0].numel() if n else 0
    if n == 0 or run_len == 0:
        return
    if not _use_kernel(dst_view.device):
        dst_view[dst_blocks, x : x + layers] = data
        return
    _launch(
        data, dst_view, n, run_len,
        None, run_len, 0,
        dst_blocks, dst_view.stride(0), x * dst_view.stride(1),
    )  # fmt: skip


def warm_up(device: torch.device, dtype: torch.dtype, trailing: Sequence[int]) -> int:
    """Compiles the variants the live KV exchange launches for a KV cache of ``dtype`` whose
    blocks are ``[layers, *trailing]`` (a view-to-view copy and a scatter; no integer argument
    is specialized, so shapes and strides add no variant), on a two-block scratch cache, so
    none compiles at a drop. Returns the launches made; a no-op off CUDA."""
    if device.type != "cuda" or not HAS_TRITON:
        return 0
    view = torch.zeros((4, 2, *trailing), dtype=dtype, device=device)
    ids = torch.tensor([0, 1], dtype=torch.int64, device=device)
    copy_block_slices(view, ids, (0, 1), view, ids + 2, (1, 2))
    scatter_block_slices(view[:2, :1].contiguous(), view, ids + 2, (0, 1))
    return 2
