"""Engine._init_kv_cache's order: on VMM memory sized from gpu_memory_utilization, the CUDA
graphs are captured over a one-request KV cache first, and the device memory they take comes
out of the KV cache; elsewhere they are captured after the KV cache (CPU-run, with a runner
double that only counts bytes: what it checks is the engine's arithmetic and order)."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from workers.block_pool import BlockPool
from workers.engine import Engine

BLOCK_BYTES = 2 << 20
GRAPH_BYTES = 5 * BLOCK_BYTES + 1  # 6 blocks' worth, rounded up


class _Runner:
    """The ModelRunner calls _init_kv_cache makes, recording their order and bytes."""

    def __init__(self, vmm: bool, budget_blocks: int) -> None:
        self.device = torch.device("cuda")  # never touched: only its type is read
        self.block_bytes = BLOCK_BYTES
        self.budget_blocks = budget_blocks
        self.free = 100 * BLOCK_BYTES
        self.calls: list[tuple[str, int]] = []
        self.memory = SimpleNamespace(kv=SimpleNamespace(block_pool=None)) if vmm else None

    def determine_num_blocks(self) -> int:
        return self.budget_blocks

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.calls.append(("allocate", num_blocks))
        if self.memory is not None:
            self.memory.kv.block_pool = BlockPool(num_blocks)

    def device_free_bytes(self) -> int:
        return self.free

    def warm_up_kernels(self) -> None:
        self.calls.append(("warm up", 0))

    def capture_cuda_graphs(self) -> None:
        self.calls.append(("capture", 0))
        self.free -= GRAPH_BYTES


def _engine(runner: _Runner, num_kv_blocks: int | None) -> Engine:
    engine = Engine.__new__(Engine)
    cache = SimpleNamespace(block_size=16, num_kv_blocks=num_kv_blocks)
    engine.config = SimpleNamespace(cache=cache, stage_graphs_at_start=0)
    engine.runner = runner
    engine.max_model_len = 160  # 10 blocks
    return engine


def test_vmm_sized_from_utilization_gives_the_graphs_memory_up() -> None:
    runner = _Runner(vmm=True, budget_blocks=50)
    _engine(runner, None)._init_kv_cache()
    assert runner.calls == [("allocate", 10), ("warm up", 0), ("capture", 0), ("allocate", 44)]


def test_a_fixed_block_count_or_torch_memory_captures_after() -> None:
    for runner, fixed in ((_Runner(vmm=True, budget_blocks=50), 50), (_Runner(False, 50), None)):
        _engine(runner, fixed)._init_kv_cache()
        assert runner.calls == [("allocate", 50), ("warm up", 0), ("capture", 0)]


def test_graphs_that_leave_too_little_kv_raise() -> None:
    runner = _Runner(vmm=True, budget_blocks=12)  # 12 - 6 < one request's 10 blocks
    with pytest.raises(ValueError, match="cannot hold one request"):
        _engine(runner, None)._init_kv_cache()


def test_the_double_matches_the_engine_config() -> None:
    """The fields the double stands in for exist on the real config."""
    from workers.config import CacheConfig, EngineConfig

    assert {"block_size", "num_kv_blocks"} <= {f.name for f in dataclasses.fields(CacheConfig)}
    assert "stage_graphs_at_start" in {f.name for f in dataclasses.fields(EngineConfig)}
