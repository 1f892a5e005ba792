"""The engine with its weights and KV cache in VMM memory (``memory_backend='vmm'``).

On CPU the emulated backend runs the real engine on stories260K against the golden greedy
outputs, with a drop and restore between requests. The ``gpu`` tests run CUDA VMM against the
torch allocator with CUDA graphs on (stories260K and a dummy GQA model) and check that the
device's free memory comes back once the engine is closed.
"""

from __future__ import annotations

import argparse
import gc
import random
from pathlib import Path

import pytest
import torch

from coordinator.cli import add_engine_args, engine_config
from tests.workers.engine_helpers import run_to_completion, write_dummy_gqa_config
from workers.config import CacheConfig, EngineConfig, SchedulerConfig, resolve_memory_backend
from workers.engine import Engine, RequestSpec
from workers.request import SamplingParams
from workers.weight_arena import HostCopy

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = torch.device("cpu")
GREEDY = SamplingParams(temperature=0.0)


def config(model_dir: Path, memory_backend: str, **cache: object) -> EngineConfig:
    return EngineConfig(
        model_path=str(model_dir),
        dtype="float32",
        cache=CacheConfig(block_size=4, **({"num_kv_blocks": 256} | cache)),
        scheduler=SchedulerConfig(max_num_batched_tokens=7, max_model_len=96),
        memory_backend=memory_backend,
    )


def generate(engine: Engine, prompts: dict[str, list[int]], max_tokens: int) -> dict:
    """Adds every prompt, steps until idle; returns each request's generated ids."""
    for rid, ids in prompts.items():
        engine.add_request(RequestSpec(rid, ids, GREEDY, max_tokens))
    return run_to_completion(engine)


def golden(cases: list[dict], indices: range) -> tuple[dict, dict]:
    """(prompts, expected greedy ids) of golden cases ``indices``, keyed by index."""
    prompts = {str(i): cases[i]["input_ids"] for i in indices}
    return prompts, {str(i): cases[i]["greedy_new_token_ids"] for i in indices}


# ---------------------------------------------------------------------------------- CPU


def test_memory_backend_resolves_validates_and_has_a_cli_flag(stories_dir: Path) -> None:
    assert resolve_memory_backend("auto", "cpu") == "torch"
    assert resolve_memory_backend("vmm", "cpu") == "vmm"
    with pytest.raises(ValueError, match=r"memory_backend 'cuda' is not one of \['auto'"):
        resolve_memory_backend("cuda", "cpu")
    with pytest.raises(ValueError, match="memory_backend must be one of"):
        config(stories_dir, "paged")
    p = argparse.ArgumentParser()
    add_engine_args(p)
    assert engine_config(p.parse_args([]), stories_dir).memory_backend == "auto"
    args = p.parse_args(["--memory-backend", "vmm"])
    assert engine_config(args, stories_dir).memory_backend == "vmm"


def test_engine_on_emulated_vmm_reproduces_the_golden_greedy_outputs(
    stories_dir: Path, golden_cases: list[dict]
) -> None:
    engine = Engine(config(stories_dir, "vmm"), CPU)
    runner, memory = engine.runner, engine.runner.memory
    assert memory is not None and Engine(config(stories_dir, "auto"), CPU).runner.memory is None
    arena = memory.arena.range
    assert all(
        arena.base <= p.data_ptr() < arena.base + arena.nbytes for p in runner.model.parameters()
    )
    assert runner.kv_cache.data_ptr() == memory.kv.base and engine.pool is memory.kv.block_pool
    assert engine.pool.num_blocks == memory.kv.num_blocks >= 256  # whole 2 MiB slots
    assert runner.graph_kv_cache.shape[0] == memory.kv.max_blocks  # graphs survive growth
    runner.kv_cache = torch.zeros(4, *memory.kv.fmt.shape)  # re-pointed elsewhere: graphs follow
    assert runner.graph_kv_cache is runner.kv_cache
    runner.refresh_kv_cache()
    prompts, expected = golden(golden_cases, range(len(golden_cases)))
    assert generate(engine, prompts, 64) == expected
    assert engine.scheduler.num_preemptions == 0
    engine.close()


def test_a_drop_and_restore_between_requests_keeps_the_greedy_outputs(
    stories_dir: Path, golden_cases: list[dict]
) -> None:
    engine = Engine(config(stories_dir, "vmm"), CPU)
    runner, memory = engine.runner, engine.runner.memory
    assert memory is not None
    prompts, expected = golden(golden_cases, range(3))
    assert generate(engine, prompts, 64) == expected
    blocks = engine.pool.num_blocks
    host = HostCopy(memory.arena, 1, 4)
    stats = memory.drop_layers(1, 4)
    runner.refresh_kv_cache()
    assert engine.pool.num_blocks == blocks + stats.blocks_added == runner.kv_cache.shape[0]
    assert stats.driver_calls == 4  # 3 layers, one chunk each, one access call
    runner.kv_cache[blocks:].fill_(7.0)  # the borrowed weight bytes really serve as KV
    memory.restore_layers(1, 4, host)
    runner.refresh_kv_cache()
    assert engine.pool.num_blocks == blocks == runner.kv_cache.shape[0]
    memory.check_integrity()
    prompts, expected = golden(golden_cases, range(3, len(golden_cases)))
    assert generate(engine, prompts, 64) == expected
    engine.close()
    assert runner.memory is None
    assert all(p.device.type == "meta" for p in runner.model.parameters())


# ---------------------------------------------------------------------------------- GPU


def cuda_engine(cfg: EngineConfig) -> Engine:
    pytest.importorskip("cuda.bindings")
    engine = Engine(cfg, torch.device("cuda"))
    assert engine.runner.cuda_graphs is not None  # graphs on
    assert (engine.runner.memory is not None) == (cfg.memory_backend == "vmm")
    return engine


def free_after_teardown(engine: Engine) -> int:
    """Closes ``engine`` and returns the device's free bytes once torch gave back its cache."""
    engine.close()
    del engine
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    return torch.cuda.mem_get_info()[0]


@pytest.mark.gpu
def test_gpu_vmm_engine_equals_torch_and_golden_on_stories_with_graphs(
    stories_dir: Path, golden_cases: list[dict]
) -> None:
    prompts, expected = golden(golden_cases, range(len(golden_cases)))
    outputs = {}
    for backend in ("torch", "vmm"):
        engine = cuda_engine(config(stories_dir, backend))
        outputs[backend] = generate(engine, prompts, 64)
        assert engine.runner.cuda_graphs.num_replays > 0
        free_after_teardown(engine)
    assert outputs["vmm"] == outputs["torch"] == expected


def dummy_model_dir(tmp_path: Path) -> Path:
    return write_dummy_gqa_config(tmp_path, num_layers=4)


@pytest.mark.gpu
def test_gpu_vmm_engine_equals_torch_on_a_dummy_gqa_model_in_bf16(tmp_path: Path) -> None:
    rng = random.Random(0)
    prompts = {
        str(i): [rng.randrange(3, 1000) for _ in range(rng.randint(1, 300))] for i in range(37)
    }
    outputs = {}
    for backend in ("torch", "vmm"):
        cfg = EngineConfig(
            model_path=str(dummy_model_dir(tmp_path)),
            load_format="dummy",
            cache=CacheConfig(block_size=16, num_kv_blocks=2048),
            scheduler=SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=4096),
            memory_backend=backend,
        )
        engine = cuda_engine(cfg)
        gen = torch.Generator(device="cuda").manual_seed(0)
        for name, p in engine.runner.model.named_parameters():  # in place: graphs read these
            if not name.endswith("norm.weight"):
                p.data.normal_(0.0, 0.02, generator=gen)
        outputs[backend] = generate(engine, prompts, 12)
        free_after_teardown(engine)
    assert outputs["vmm"] == outputs["torch"]
    assert len(outputs["vmm"]) == 37


@pytest.mark.gpu
def test_gpu_free_memory_returns_after_a_profiled_vmm_engine_is_torn_down(
    stories_dir: Path, golden_cases: list[dict]
) -> None:
    prompts, expected = golden(golden_cases, range(2))
    warm = cuda_engine(config(stories_dir, "vmm"))  # kernels, cuBLAS and caches load once
    assert generate(warm, prompts, 64) == expected
    start = free_after_teardown(warm)
    total = torch.cuda.mem_get_info()[1]
    engine = cuda_engine(config(stories_dir, "vmm", num_kv_blocks=None, gpu_memory_utilization=0.3))
    memory = engine.runner.memory
    used = total - torch.cuda.mem_get_info()[0]
    assert used <= 0.3 * total + (256 << 20)  # the budget holds, VMM chunks counted once
    assert memory.kv.mapped_bytes >= 0.8 * (0.3 * total - (total - start))  # KV got the rest
    assert generate(engine, prompts, 64) == expected
    assert abs(free_after_teardown(engine) - start) < 64 << 20
