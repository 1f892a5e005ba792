"""Shared builders for the planner tests: Llama-3-8B's shape, an H100-like step profile, loads.

Served as fixtures so that test modules import nothing from this file.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from planner.cost_model import CostModel, StepProfile
from planner.types import InstanceLoad, ModelShape

KV_BLOCKS = 25_600
"""Normal KV capacity of one instance: 50 GiB of 2 MiB blocks (Llama-3-8B, block_size 16)."""

REQUEST_BLOCKS = 128
"""Blocks of one 2k-token request at block_size 16."""


def decode_seconds(num_layers: int, batch: int) -> float:
    """Memory-bound decode on an H100-like GPU at 1k context: 0.4 ms of LM head and launches,
    0.13 ms per layer of weights (436 MB at 3.35 TB/s), 1.2 us per sequence per layer of KV."""
    return 0.4e-3 + num_layers * (0.13e-3 + 1.2e-6 * batch)


@pytest.fixture(name="decode_seconds")
def decode_seconds_fixture() -> Callable[[int, int], float]:
    return decode_seconds


@pytest.fixture
def llama3_8b() -> ModelShape:
    """Llama-3-8B in bf16 with 16-token blocks: 32 layers of 436,224,000 bytes (W = 13.96 GB),
    128 KiB of KV per token, 2 MiB per full block."""
    return ModelShape.from_dims(
        num_layers=32,
        hidden_size=4096,
        intermediate_size=14336,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        vocab_size=128256,
        dtype_bytes=2,
        block_size=16,
    )


@pytest.fixture
def h100_profile() -> StepProfile:
    """``decode_seconds`` at 8/16/32 layers and batch 1/16/64/256; NVLink-like link."""
    points = {(n, b): decode_seconds(n, b) for n in (8, 16, 32) for b in (1, 16, 64, 256)}
    return StepProfile(decode=points, link_bandwidth_bytes_per_s=350e9, link_latency_s=20e-6)


@pytest.fixture
def cost_model(h100_profile: StepProfile, llama3_8b: ModelShape) -> CostModel:
    return CostModel(h100_profile, llama3_8b)


def _make_load(
    instance_id: int,
    demand: float,
    *,
    capacity: int = KV_BLOCKS,
    waiting_requests: int | None = None,
    num_running: int | None = None,
    **fields: object,
) -> InstanceLoad:
    """An instance at ``demand`` (fraction of ``capacity``). Running requests hold what fits;
    the rest waits. Request counts default to ``REQUEST_BLOCKS`` blocks per request."""
    need = round(demand * capacity)
    used = min(need, capacity)
    waiting_blocks = need - used
    if waiting_requests is None:
        waiting_requests = -(-waiting_blocks // REQUEST_BLOCKS)
    return InstanceLoad(
        instance_id=instance_id,
        kv_blocks_total=capacity,
        kv_blocks_used=used,
        kv_demand_blocks=need,
        num_waiting=waiting_requests,
        waiting_demand_blocks=waiting_blocks,
        num_running=used // REQUEST_BLOCKS if num_running is None else num_running,
        **fields,
    )


@pytest.fixture
def make_load() -> Callable[..., InstanceLoad]:
    return _make_load
