"""VmmStageMemory: a drop hands the dropped layers' chunks to the KV bytes (no copy), a restore
takes them back and refills them from the stage that kept them. On CPU over the emulated VMM
backend (stories260K, float32): the memory alone with stages in threads, and the engine through
a drop and a restore over gloo; marked ``gpu``, the memory over NCCL on two GPUs."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from attention.transport import StageTransport
from kernels.vmm import make_backend
from planner.drop_plan import stage_layer_ranges
from tests.workers.pipeline_helpers import (
    BLOCK_SIZE,
    CPU,
    LoopbackTransport,
    engine_config,
    requests_for,
    run_alone,
    spawn_gloo,
    tokens_by_request,
)
from workers.forward_context import ForwardContext, set_forward_context
from workers.kv_pool import KVBlockFormat
from workers.memory import WorkerMemory
from workers.model_runner import ModelRunner
from workers.models.llama import LlamaModel
from workers.request import Request, SamplingParams
from workers.scheduler import ScheduledRequest, SchedulerOutput
from workers.stage_memory import TorchStageMemory, VmmStageMemory, stage_memory_for

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CHUNK = 64 << 10
"""Emulated slot size: a stories260K layer (181,760 bytes) is one chunk of 3 slots."""
LAYER_CHUNK_BYTES = 3 * CHUNK
KV_SLOTS = 2
"""Normal-mode KV bytes: 2 slots, 25 blocks of 5 layers (5,120 bytes each)."""
F32 = torch.float32
PROMPT = [1, 403, 407, 261, 378, 432, 383]
MiB = 1 << 20
alone = functools.cache(run_alone)
"""Each request's tokens alone on a full engine (the reference), computed once a session."""


class Worker:
    """One worker's model in its own VMM memory, and the StageMemory over it."""

    def __init__(self, model_dir: Path, device: torch.device, chunk_bytes: int | None) -> None:
        config = engine_config(model_dir, memory_backend="torch")  # weights move into VMM below
        self.runner = ModelRunner(config, device)
        cfg = self.runner.model_config
        fmt = KVBlockFormat(cfg.num_layers, BLOCK_SIZE, cfg.num_kv_heads, cfg.head_dim, F32)
        backend = make_backend(device, chunk_bytes)
        self.memory = WorkerMemory.for_model(self.runner.model, F32, fmt, KV_SLOTS, backend)
        self.memory.owns_backend = True
        self.stage = VmmStageMemory(self.memory)
        self.model: LlamaModel = self.runner.model

    @property
    def backend_calls(self) -> int:
        return sum(self.memory.backend.calls.values())

    def weight_bytes(self) -> torch.Tensor:
        """A copy of the whole weight range (embedding, every layer, head, padding)."""
        arena = self.memory.arena.range
        return arena.view(0, (arena.nbytes,), torch.uint8).clone()

    @torch.inference_mode()
    def logits(self) -> torch.Tensor:
        """[len(PROMPT), vocab] prefill logits of ``model`` over a KV cache of its own."""
        req = Request("p", PROMPT, SamplingParams(temperature=0.0), 8, frozenset())
        req.block_ids = [0, 1]
        out = SchedulerOutput(scheduled=[ScheduledRequest(req, len(PROMPT))])
        inputs = self.runner.prepare(out)
        kv = torch.zeros(2, *self.memory.kv.fmt.shape, device=self.runner.device)
        with set_forward_context(ForwardContext(inputs.meta, kv)):
            hidden, _ = self.model(inputs.positions, input_ids=inputs.input_ids)
        return self.model.compute_logits(hidden)


@pytest.fixture
def make_workers(stories_dir: Path) -> Iterator[Callable[[int], list[Worker]]]:
    made: list[Worker] = []

    def make(n: int) -> list[Worker]:
        made.extend(Worker(stories_dir, CPU, CHUNK) for _ in range(n))
        return made[-n:]

    yield make
    for w in made:
        w.memory.close()


def restore_all(workers: list[Worker], ranges: list[tuple[int, int]]) -> None:
    """Every stage restores at once, one thread each, over a loopback transport."""
    links: dict = {}
    ranks = tuple(range(len(workers)))
    errors: list[BaseException] = []

    def run(r: int) -> None:
        w = workers[r]
        try:
            transport = LoopbackTransport(r, links, w.runner.model_config.hidden_size)
            with torch.inference_mode():
                w.model = w.stage.restore(w.model, ranks, ranges, r, transport)
        except BaseException as e:  # re-raised below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(r,)) for r in ranks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    if errors:
        raise errors[0]
    assert not any(q.qsize() for q in links.values())  # every message was received


# ---------------------------------------------------------------------------------- CPU


@pytest.mark.parametrize(
    ("stage", "dropped", "slots"),
    [((0, 3), [(3, 6)], 3 + 3 + 3), ((3, 5), [(-1, 3)], 2 + 3 * 3)],
)
def test_drop_grows_the_kv_bytes_by_exactly_the_dropped_regions_chunks(
    make_workers: Callable[[int], list[Worker]],
    stage: tuple[int, int],
    dropped: list[tuple[int, int]],
    slots: int,
) -> None:
    """Arena regions: -1 the embedding (2 slots), 0..4 the layers (3 slots each), 5 the head
    (final norm and LM head, 3 slots). The first stage drops the later layers and the head,
    the last stage the embedding and the earlier layers."""
    (w,) = make_workers(1)
    mem, kv, arena = w.stage, w.memory.kv, w.memory.arena
    regions = [j for a, b in dropped for j in range(a, b)]
    chunk_bytes = sum(c.nbytes for j in regions for c in arena.layer_chunks(j, j + 1))
    assert mem.normal_bytes == mem.nbytes == KV_SLOTS * CHUNK
    assert chunk_bytes == slots * CHUNK
    assert mem.bytes_after_drop(w.model, stage) == mem.nbytes + chunk_bytes
    prefix = kv.prefix_bytes()
    prefix.copy_(torch.randint(0, 256, prefix.shape, dtype=torch.uint8))
    before, calls = prefix.clone(), w.backend_calls
    kv.block_pool.allocate(7)  # pre-drop requests' blocks: the group schedules on its own pool
    full = w.model
    old_layers = list(full.layers)
    w.model = mem.drop(full, stage)
    start, end = stage
    assert mem.nbytes == KV_SLOTS * CHUNK + chunk_bytes
    assert w.backend_calls - calls == len(regions) + 1  # a cuMemMap a region, one access call
    view = mem.view(end - start)
    assert view.shape == (mem.nbytes // mem.block_bytes(end - start), end - start, 2, 4, 4, 8)
    assert view.data_ptr() == kv.base == mem.view(5).data_ptr()
    assert torch.equal(kv.prefix_bytes()[: before.numel()], before)  # the prefix kept its bytes
    assert (w.model.start, w.model.end) == stage
    assert list(w.model.layers) == old_layers[start:end]  # moved, not copied
    lo, hi = arena.range.base, arena.range.base + arena.range.nbytes
    assert all(lo <= p.data_ptr() < hi for p in w.model.parameters())
    gone = {-1: [full.embed_tokens], 5: [full.norm, full.lm_head]}
    for j in regions:
        modules = gone[j] if j in gone else [old_layers[j]]
        assert all(p.is_meta for m in modules for p in m.parameters()), j
    assert (kv.block_pool.num_used, kv.num_blocks) == (0, mem.view(5).shape[0])
    w.memory.check_integrity()


def test_a_drop_staged_while_the_full_model_serves_leaves_the_drop_no_driver_call(
    make_workers: Callable[[int], list[Worker]],
) -> None:
    """``stage_drop`` runs beside the engine: the full model's logits do not change (the
    last stage's layers are not re-pointed at their stage KV slots yet, no parameter moves),
    the mappings are made then, and the drop itself makes no driver call and ends where an
    unstaged drop ends. A staging for another range is not used."""
    w, plain = make_workers(2)
    mem, full = w.stage, w.model
    ref = w.logits()
    calls = w.backend_calls
    staged = mem.stage_drop(full, (3, 5))
    assert staged.premapped == 4 and w.backend_calls - calls == 4 + 1  # embedding, 3 layers
    assert mem.nbytes == mem.normal_bytes  # nothing handed to the KV yet
    assert [layer.self_attn.local_layer for layer in full.layers] == [0, 1, 2, 3, 4]
    assert torch.equal(w.logits(), ref)
    calls = w.backend_calls
    w.model = mem.drop(full, (3, 5), staged)
    assert w.backend_calls == calls
    plain.model = plain.stage.drop(plain.model, (3, 5))
    assert mem.nbytes == plain.stage.nbytes
    assert [layer.self_attn.local_layer for layer in w.model.layers] == [0, 1]
    assert [n for n, _ in w.model.named_parameters()] == [
        n for n, _ in plain.model.named_parameters()
    ]
    assert all(p.is_meta for m in (full.embed_tokens, *full.layers[:3]) for p in m.parameters())
    assert not any(p.is_meta for p in w.model.parameters())
    w.memory.check_integrity()
    (other,) = make_workers(1)
    stale = other.stage.stage_drop(other.model, (3, 5))
    other.model = other.stage.drop(other.model, (0, 3), stale)
    assert (other.model.start, other.model.end) == (0, 3)
    assert not any(p.is_meta for p in other.model.parameters())
    other.memory.check_integrity()


@pytest.mark.parametrize("world", [2, 3])
def test_restore_refills_the_exact_weights_from_the_stages_that_kept_them(
    make_workers: Callable[[int], list[Worker]], world: int
) -> None:
    """Drop, use the borrowed bytes as KV, restore: twice. Each time every worker's weight range
    is byte for byte what it was, the KV prefix kept its bytes, and the full model bound to the
    arena computes the same logits. The second round trip makes no driver call at all (lazy)."""
    workers = make_workers(world)
    ranges = stage_layer_ranges(5, world)
    weights = [w.weight_bytes() for w in workers]
    logits = workers[0].logits()
    for w in workers:
        w.memory.kv.prefix_bytes().fill_(0x5A)
    for trip in range(2):
        calls = [w.backend_calls for w in workers]
        for w, stage in zip(workers, ranges, strict=True):
            w.model = w.stage.drop(w.model, stage)
            w.memory.check_integrity()
            w.memory.kv.prefix_bytes()[w.stage.normal_bytes :].fill_(0xEE)  # KV over the weights
        restore_all(workers, ranges)
        for w, before, stage, n in zip(workers, weights, ranges, calls, strict=True):
            regions = 5 - (stage[1] - stage[0]) + (stage[0] > 0) + (stage[1] < 5)
            # a cuMemMap per region, one cuMemSetAccess: the drop's chunks lie back to back
            assert w.backend_calls - n == (0 if trip else regions + 1)
            assert torch.equal(w.weight_bytes(), before)
            assert w.stage.nbytes == w.stage.normal_bytes
            assert bool((w.memory.kv.prefix_bytes() == 0x5A).all())  # the prefix kept its bytes
            assert (w.model.start, w.model.end) == (0, 5)
            arena = w.memory.arena
            for name, p in w.model.named_parameters():
                assert p.data_ptr() == arena.tensor(name).data_ptr(), name
            assert w.memory.kv.num_blocks == w.stage.view(5).shape[0] == 25
            w.memory.check_integrity()
        assert all(torch.equal(w.logits(), logits) for w in workers)


def test_a_restore_that_does_not_match_the_drop_raises_before_any_transfer(
    make_workers: Callable[[int], list[Worker]],
) -> None:
    (w,) = make_workers(1)
    w.model = w.stage.drop(w.model, (0, 3))
    with pytest.raises(ValueError, match=r"do not split \[0, 5\)"):
        w.stage.restore(w.model, (0, 1), [(0, 3), (4, 5)], 0, None)
    with pytest.raises(ValueError, match=r"keeps \[0, 2\) but the arena has dropped \[3, 4, 5\]"):
        w.stage.restore(w.model, (0, 1, 2), [(0, 2), (2, 3), (3, 5)], 0, None)
    with pytest.raises(ValueError, match=r"\[3, 6\) is not inside \[0, 3\)"):
        w.stage.drop(w.model, (3, 6))
    w.memory.check_integrity()


def test_stage_memory_for_a_runner_follows_its_memory_backend(stories_dir: Path) -> None:
    torch_runner = ModelRunner(engine_config(stories_dir), CPU)
    torch_runner.allocate_kv_cache(8)
    assert isinstance(stage_memory_for(torch_runner), TorchStageMemory)
    runner = ModelRunner(engine_config(stories_dir, memory_backend="vmm"), CPU)
    runner.allocate_kv_cache(8)
    mem = stage_memory_for(runner)
    assert isinstance(mem, VmmStageMemory) and mem.memory is runner.memory
    view = mem.view(5)
    assert (view.data_ptr(), view.shape) == (runner.kv_cache.data_ptr(), runner.kv_cache.shape)
    runner.close()


@pytest.mark.parametrize("world", [2, 3])
def test_gloo_engines_on_vmm_memory_drop_and_restore_keeping_every_token(
    stories_dir: Path, tmp_path: Path, world: int
) -> None:
    """tests/workers/test_pipeline.py's drop/restore run on VMM memory (2 MiB emulated chunks:
    a stories260K layer is one chunk, the normal KV one chunk of 409 blocks): every request's
    tokens equal its tokens alone on a full engine (pre-drop requests through remote attention
    over the L-layer view of the grown bytes), capacities follow the chunk bytes, and the
    memory passes its integrity check after each transition."""
    results = spawn_gloo("drop_restore_vmm", stories_dir, tmp_path, world)
    rids = requests_for(world)
    assert tokens_by_request(results) == {rid: alone(stories_dir, rid) for rid in rids}
    ranges = stage_layer_ranges(5, world)
    normal, full_block = 2 * MiB, 5 * BLOCK_SIZE * 2 * 4 * 8 * 4
    expected = []
    for start, end in ranges:
        freed = (5 - (end - start) + (start > 0) + (end < 5)) * 2 * MiB  # + embedding, head
        expected.append([(normal + freed) // (full_block * (end - start) // 5), freed, 409])
    assert results[0]["reports"] == expected
    if world == 2:  # pre-drop requests read their KV through the L-layer view of VMM bytes
        for r in results:
            assert min(r["counters"].get(k, 0) for k in ("moved", "sent", "served")) > 0
        assert results[1]["counters"].get("home", 0) > 0  # stage 1's own layers, at home
    for r, (stage_blocks, _, _) in zip(results, expected, strict=True):
        assert r["pipelined"]["kv_blocks"] == stage_blocks
        assert r["pipelined"]["pool_blocks"] == min(e[0] for e in expected)
        restored = {"group_id": None, "layer_range": [0, 5], "kv_blocks": 409, "pool_blocks": 409}
        assert r["restored"] == restored | {"stage_loop": False}


# ---------------------------------------------------------------------------------- GPU


def _nccl_round_trip(rank: int, init_file: str, model_dir: str) -> None:
    """Two GPUs, one stage each: drop, overwrite the borrowed bytes, restore over NCCL; the
    weights come back byte for byte and the logits equal those before the drop."""
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=2)
    device = torch.device("cuda", rank)
    w = Worker(Path(model_dir), device, None)
    weights, logits = w.weight_bytes(), w.logits()
    ranges = stage_layer_ranges(5, 2)
    transport = StageTransport(device, w.runner.model_config.hidden_size, F32)
    for _ in range(2):
        with torch.inference_mode():
            w.model = w.stage.drop(w.model, ranges[rank])
            w.memory.kv.prefix_bytes()[w.stage.normal_bytes :].fill_(0xEE)
            w.model = w.stage.restore(w.model, (0, 1), ranges, rank, transport)
        torch.cuda.synchronize()
        assert torch.equal(w.weight_bytes(), weights)
        torch.testing.assert_close(w.logits(), logits)
        w.memory.check_integrity()
    dist.barrier()
    w.memory.close()
    dist.destroy_process_group()


@pytest.mark.gpu
def test_gpu_drop_and_restore_over_nccl_refill_the_exact_weights(
    stories_dir: Path, tmp_path: Path
) -> None:
    pytest.importorskip("cuda.bindings")
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    args = (str(tmp_path / "init"), str(stories_dir))
    mp.spawn(_nccl_round_trip, args=args, nprocs=2, join=True)
