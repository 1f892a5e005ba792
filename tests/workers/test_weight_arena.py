"""The weight arena: chunk-aligned layout, a real model running on arena weights and KV-pool
cache, drop and restore from a host copy or a peer (gloo on CPU, NCCL marked ``gpu``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kernels.vmm import ChunkBackend, ChunkPool, make_backend
from kernels.vmm_emulated import EmulatedBackend
from workers.config import CacheConfig, EngineConfig, SchedulerConfig
from workers.forward_context import ForwardContext, set_forward_context
from workers.kv_pool import KVBlockFormat
from workers.memory import WorkerMemory
from workers.model_runner import ModelRunner
from workers.request import Request, SamplingParams
from workers.scheduler import ScheduledRequest, SchedulerOutput
from workers.weight_arena import (
    TENSOR_ALIGN,
    ArenaLayout,
    HostCopy,
    PeerSource,
    WeightArena,
    layout_for_model,
    send_layers,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CHUNK = 64 << 10
F32 = torch.float32
PROMPTS = [[1, 403, 407, 261, 378], [1, 291, 376, 280, 294, 286, 399, 296, 418, 329]]


@pytest.fixture
def backend() -> Iterator[ChunkBackend]:
    b = EmulatedBackend(CHUNK)
    yield b
    b.close()


def layer_groups(num_layers: int, floats_per_layer: int) -> list:
    """embed, ``num_layers`` layers of one weight and one norm each, head."""
    groups = [("embed", None, [("embed.weight", (100, 10), F32)])]
    for i in range(num_layers):
        specs = [(f"layers.{i}.w", (floats_per_layer,), F32), (f"layers.{i}.norm", (10,), F32)]
        groups.append((f"layer.{i}", i, specs))
    return groups + [("head", None, [("head.weight", (7,), torch.bfloat16)])]


def make_runner(model_dir: Path, device: torch.device) -> ModelRunner:
    config = EngineConfig(
        model_path=str(model_dir),
        dtype="float32",
        attention_backend="torch",
        cache=CacheConfig(block_size=4, num_kv_blocks=16),
        scheduler=SchedulerConfig(max_num_batched_tokens=256, max_model_len=64),
    )
    runner = ModelRunner(config, device)
    runner.allocate_kv_cache(16)
    return runner


def prefill_logits(runner: ModelRunner) -> torch.Tensor:
    """[num_tokens, vocab] logits of every prompt position, prompts in blocks 0, 1, 2, ..."""
    scheduled, block = [], 0
    for i, ids in enumerate(PROMPTS):
        req = Request(f"p{i}", ids, SamplingParams(temperature=0.0), 8, frozenset())
        req.block_ids = list(range(block, block + -(-len(ids) // 4)))
        block += len(req.block_ids)
        scheduled.append(ScheduledRequest(req, len(ids)))
    inputs = runner.prepare(SchedulerOutput(scheduled=scheduled))
    with torch.inference_mode(), set_forward_context(ForwardContext(inputs.meta, runner.kv_cache)):
        hidden, _ = runner.model(inputs.positions, input_ids=inputs.input_ids)
        return runner.model.compute_logits(hidden)


def kv_format(runner: ModelRunner) -> KVBlockFormat:
    cfg = runner.model_config
    return KVBlockFormat(runner.layers_per_block, 4, cfg.num_kv_heads, cfg.head_dim, F32)


# ------------------------------------------------------------------------------- layout


def test_layout_gives_each_layer_whole_chunks_and_aligned_tensors() -> None:
    layout = ArenaLayout.build(layer_groups(3, 20_000), CHUNK)  # 80 KiB + a norm: 2 chunks
    spans = [(r.key, r.first_slot, r.num_slots) for r in layout.regions]
    assert spans == [
        ("embed", 0, 1),
        ("layer.0", 1, 2),
        ("layer.1", 3, 2),
        ("layer.2", 5, 2),
        ("head", 7, 1),
    ]
    assert layout.num_slots == 8 and layout.layers == [0, 1, 2]
    assert layout.layer_run(1, 3) == (3, 4)
    region, norm = layout.place("layers.1.norm")
    assert norm.offset == 3 * CHUNK + 80_128  # 80_000 rounded up to 256
    assert norm.offset % TENSOR_ALIGN == 0 and region.layer == 1


def test_layout_rejects_gaps_duplicates_and_unknown_names() -> None:
    groups = layer_groups(3, 10)
    with pytest.raises(ValueError, match=r"consecutive and ascending, got \[0, 2\]"):
        ArenaLayout.build([groups[0], groups[1], groups[3]], CHUNK)
    with pytest.raises(ValueError, match="a tensor name appears twice"):
        ArenaLayout.build([groups[1], ("layer.1", 1, groups[1][2])], CHUNK)
    layout = ArenaLayout.build(groups, CHUNK)
    with pytest.raises(KeyError, match="tensor 'layers.9.w' is not in the arena layout"):
        layout.place("layers.9.w")
    with pytest.raises(
        ValueError, match=r"layer range \[2, 4\) is empty or outside the held \[0, 3\)"
    ):
        layout.layer_run(2, 4)


def test_layout_for_a_meta_model_follows_the_stage(stories_dir: Path) -> None:
    from attention.backends import TorchBackend
    from workers.config import ModelConfig
    from workers.models.llama import LlamaModel

    with torch.device("meta"):
        stage = LlamaModel(ModelConfig.from_dir(stories_dir), TorchBackend(), (2, 5))
    layout = layout_for_model(stage, torch.bfloat16, CHUNK)
    assert [r.key for r in layout.regions] == ["layer.2", "layer.3", "layer.4", "head"]
    _, qkv = layout.place("layers.0.self_attn.qkv_proj.weight")
    assert (qkv.shape, qkv.dtype, qkv.offset) == ((128, 64), torch.bfloat16, 256)  # after a norm


# ---------------------------------------------------------------- a real model in the arena


def test_model_in_arena_and_kv_pool_computes_the_same_logits(stories_dir: Path) -> None:
    runner = make_runner(stories_dir, torch.device("cpu"))
    expected = prefill_logits(runner)
    mem = WorkerMemory.for_model(
        runner.model, F32, kv_format(runner), 2, backend=make_backend("cpu", CHUNK)
    )
    runner.kv_cache = mem.kv.kv_cache
    lo, hi = mem.arena.range.base, mem.arena.range.base + mem.arena.range.nbytes
    assert all(lo <= p.data_ptr() < hi for p in runner.model.parameters())
    torch.testing.assert_close(prefill_logits(runner), expected, rtol=0, atol=0)
    host = HostCopy(mem.arena, 1, 4)
    stats = mem.drop_layers(1, 4)
    assert stats.nbytes == mem.arena.layer_nbytes(1, 4) == 9 * CHUNK
    runner.kv_cache = mem.kv.kv_cache  # the same base, more blocks
    mem.kv.kv_cache.fill_(float("nan"))  # the borrowed chunks get overwritten as KV
    mem.restore_layers(1, 4, host)
    runner.kv_cache = mem.kv.kv_cache
    torch.testing.assert_close(prefill_logits(runner), expected, rtol=0, atol=0)
    mem.check_integrity()
    mem.close()


def test_a_meta_model_bound_to_the_arena_loads_and_computes_the_same_logits(
    stories_dir: Path,
) -> None:
    """The integration path: build on meta, bind to arena views, load, run."""
    from safetensors.torch import load_file

    from attention.backends import TorchBackend
    from workers.models.llama import LlamaModel

    runner = make_runner(stories_dir, torch.device("cpu"))
    expected = prefill_logits(runner)
    with torch.device("meta"):
        model = LlamaModel(runner.model_config, TorchBackend(), None, runner.max_model_len)
    mem = WorkerMemory.for_model(model, F32, kv_format(runner), 2, make_backend("cpu", CHUNK))
    model.cos_sin_cache = torch.empty(0)
    model.reset_rope_cache()
    loaded = model.load_weights(load_file(stories_dir / "model.safetensors").items())
    assert loaded == {n for n, _ in model.named_parameters()}
    runner.model, runner.kv_cache = model.eval(), mem.kv.kv_cache
    torch.testing.assert_close(prefill_logits(runner), expected, rtol=0, atol=0)
    mem.close()


def test_restore_from_a_host_copy_of_a_wider_range(backend: ChunkBackend) -> None:
    pool = ChunkPool(backend, 8)
    arena = WeightArena(pool, ArenaLayout.build(layer_groups(3, 10_000), CHUNK))
    for i in range(3):
        arena.tensor(f"layers.{i}.w").fill_(float(i + 1))
    host = HostCopy(arena, 0, 3)
    chunks = arena.drop_layers(1, 3)
    assert len(chunks) == arena.num_layer_slots(1, 3) == 2
    arena.restore_layers(2, 3, chunks[1:], host)
    arena.restore_layers(1, 2, chunks[:1], host)
    assert [float(arena.tensor(f"layers.{i}.w")[-1]) for i in range(3)] == [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match=r"host copy holds layers \[0, 3\), not \[0, 4\)"):
        host.fill(arena, 0, 4)
    again = arena.drop_layers(1, 2)
    with pytest.raises(ValueError, match=r"layers \[1, 2\) need chunks of 1 slots in all, got 2"):
        arena.restore_layers(1, 2, again + again, host)
    arena.restore_layers(1, 2, again, None)
    arena.close()
    pool.close()


def test_arena_needs_enough_free_chunks(backend: ChunkBackend) -> None:
    pool = ChunkPool(backend, 3)
    with pytest.raises(ValueError, match="chunk pool has 3 free chunks, the arena needs 5"):
        WeightArena(pool, ArenaLayout.build(layer_groups(3, 10), CHUNK))
    pool.close()


# ------------------------------------------------------------------------------ peer restore


def _peer_worker(rank: int, init_file: str, device_type: str) -> None:
    """Rank 1 keeps layers 1..3 and sends them; rank 0 drops them and restores from rank 1."""
    backend_name = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(
        backend_name, init_method=f"file://{init_file}", rank=rank, world_size=2
    )
    chunk = None if device_type == "cuda" else CHUNK
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    backend = make_backend(device, chunk)
    pool = ChunkPool(backend, 16)
    arena = WeightArena(pool, ArenaLayout.build(layer_groups(4, 30_000), backend.chunk_bytes))
    for i in range(4):
        arena.tensor(f"layers.{i}.w").fill_(float(10 * i + rank))
    if rank == 1:
        send_layers(arena, 1, 3, dst=0)
    else:
        chunks = arena.drop_layers(1, 3)
        arena.restore_layers(1, 3, chunks, PeerSource(src=1))
        got = [float(arena.tensor(f"layers.{i}.w").mean()) for i in range(4)]
        assert got == [0.0, 11.0, 21.0, 30.0], got
    dist.barrier()
    arena.close()
    pool.close()
    dist.destroy_process_group()


def test_restore_from_a_peer_over_gloo(tmp_path: Path) -> None:
    mp.spawn(_peer_worker, args=(str(tmp_path / "init"), "cpu"), nprocs=2, join=True)


@pytest.mark.gpu
def test_gpu_restore_from_a_peer_over_nccl(tmp_path: Path) -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    mp.spawn(_peer_worker, args=(str(tmp_path / "init"), "cuda"), nprocs=2, join=True)


@pytest.mark.gpu
def test_gpu_model_in_arena_survives_drop_and_restore(stories_dir: Path) -> None:
    pytest.importorskip("cuda.bindings")
    device = torch.device("cuda", 0)
    runner = make_runner(stories_dir, device)
    expected = prefill_logits(runner)
    mem = WorkerMemory.for_model(runner.model, F32, kv_format(runner), 2, device=device)
    runner.kv_cache = mem.kv.kv_cache
    torch.testing.assert_close(prefill_logits(runner), expected)
    host = HostCopy(mem.arena, 0, 5)
    mem.drop_layers(0, 5)
    mem.kv.kv_cache.fill_(float("nan"))
    mem.restore_layers(0, 5, host)
    runner.kv_cache = mem.kv.kv_cache
    torch.testing.assert_close(prefill_logits(runner), expected)
    mem.check_integrity()
    mem.close()
