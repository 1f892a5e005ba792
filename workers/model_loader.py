"""Builds a model stage on a device and fills it from safetensors or with dummy weights."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from attention.backends import AttentionBackend
from workers.config import ModelConfig
from workers.models.llama import LlamaModel

logger = logging.getLogger(__name__)


def build_model(
    cfg: ModelConfig,
    model_dir: Path,
    backend: AttentionBackend,
    device: torch.device,
    dtype: torch.dtype,
    layer_range: tuple[int, int] | None = None,
    load_format: str = "auto",
    max_positions: int | None = None,
    place: Callable[[LlamaModel], None] | None = None,
) -> LlamaModel:
    """Returns the stage for ``layer_range`` on ``device`` in ``dtype``, in eval mode.

    The stage is built on the meta device (no memory), then its parameters get memory: from
    ``place`` when given, which must bind every parameter to a ``dtype`` tensor on ``device``
    that the caller owns (``WorkerMemory.for_model``: views of a VMM weight arena), else from
    torch (``to_empty``). Then they are filled: ``load_format='dummy'`` with small uniform
    noise (norms with ones), as vLLM does for benchmarks of large shapes, else from the
    checkpoint. Raises ValueError when the checkpoint lacks a tensor the stage needs or has a
    tensor of the wrong shape, or when ``place`` leaves a parameter on the meta device.
    """
    with torch.device("meta"):
        model = LlamaModel(cfg, backend, layer_range, max_positions)
    if place is None:
        model = model.to_empty(device=device).to(dtype)
    else:
        place(model)
        unbound = [n for n, p in model.named_parameters() if p.device.type == "meta"]
        if unbound:
            raise ValueError(f"place left parameters unbound: {unbound[:8]}")
        model.cos_sin_cache = torch.empty(0, device=device)
    model.reset_rope_cache()
    if load_format == "dummy":
        _fill_dummy(model)
    else:
        _load_safetensors(model, Path(model_dir))
    return model.eval().requires_grad_(False)


def _fill_dummy(model: LlamaModel, seed: int = 0) -> None:
    gen = torch.Generator(device=model.cos_sin_cache.device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("layernorm.weight") or name == "norm.weight":
            p.data.fill_(1.0)
        else:
            p.data.uniform_(-1e-3, 1e-3, generator=gen)


def _load_safetensors(model: LlamaModel, model_dir: Path) -> None:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no *.safetensors files in {model_dir}")
    loaded = model.load_weights(_iter_tensors(model, files))
    missing = set(dict(model.named_parameters())) - loaded
    if missing:
        raise ValueError(f"checkpoint {model_dir} lacks weights for: {sorted(missing)[:8]}")
    logger.info("loaded layers [%d, %d) from %s", model.start, model.end, model_dir)


def _iter_tensors(model: LlamaModel, files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields only the tensors this stage holds, so a stage never reads other stages' layers."""
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():  # noqa: SIM118 (safe_open is not a dict)
                if model.map_weight_name(name):
                    yield name, st.get_tensor(name)
