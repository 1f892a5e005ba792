"""VMM benchmark: drop and restore half the layers of a dummy Llama-3-8B (bf16) on CUDA GPUs.

One call runs everything and writes JSON::

    python -c "from kernels.bench_vmm import run_vmm_bench; run_vmm_bench('out/vmm.json')"

On GPU 0 it builds the model on the meta device, places its parameters in a VMM weight arena
(``workers.memory.WorkerMemory``: each layer one chunk of whole 2 MiB slots) beside a 2 GiB KV
pool, fills them with dummy values, then ``repeats`` times:

- **drop** layers 16..31 into the KV pool (target: ≤ 50 ms, decision to usable KV; DESIGN §8),
  counting the driver calls it makes (``drop_driver_calls``: 16 ``cuMemMap``, one
  ``cuMemSetAccess`` and one context check when lazy);
- **restore** them from a pinned host copy, timed until the copies finished, against the
  **PCIe floor**: one pinned host-to-device copy of the same bytes into ordinary device
  memory, measured in the same run (target ≤ 1.2× floor);

in each of the ``SCENARIOS`` (eager unmapping; lazy, where the restore adopts the chunks back;
lazy with an idle ``flush`` between, so the restore maps every chunk again; premapped, where an
idle ``premap_drop`` mapped the layers into the KV range beforehand, so the drop calls nothing).

With two GPUs it also restores the layers on GPU 0 from GPU 1 over NCCL (``PeerSource``)
against the **link floor**, one NCCL send/recv of the same bytes between ordinary buffers
(target ≤ 2×). It also reports VMM op costs (create, map + one access call, unmap) for 256
one-slot chunks, per chunk, and for one chunk of 256 slots, for comparison with
memory-systems.md §6.3: whether a mapping's cost is per call or per 2 MiB. Times are medians, in milliseconds unless named
``_us``. Importing this module needs neither a GPU nor cuda-python; it imports ``workers``
inside functions (a benchmark of the stores built on this package's remapper).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

DROP = (16, 32)
KV_CHUNKS = 1024
"""Initial KV pool: 2 GiB."""
MODEL = Path(__file__).resolve().parents[1] / "workers" / "checkpoint" / "configs" / "llama-3-8b"


def run_vmm_bench(
    out_json: str | Path | None = None, repeats: int = 5, peer: bool | None = None
) -> dict:
    """Runs the benchmark; returns (and writes to ``out_json``) a dict with ``single`` (drop,
    restore from host, floors, ratios, VMM op costs) and ``peer`` (None without 2 GPUs).
    Raises RuntimeError without a CUDA GPU; AssertionError if a restore loses bytes."""
    if not torch.cuda.is_available():
        raise RuntimeError("run_vmm_bench needs a CUDA GPU")
    import cuda.bindings

    peer = torch.cuda.device_count() >= 2 if peer is None else peer
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "cuda_bindings": cuda.bindings.__version__,
        "dropped_layers": list(DROP),
        "single": _single_gpu(repeats),
        "peer": _peer_run(repeats) if peer else None,
    }
    print(json.dumps(result, indent=1))
    if out_json is not None:
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(out_json).write_text(json.dumps(result, indent=1))
    return result


def build_dummy_memory(device: torch.device, seed: int = 0) -> tuple[torch.nn.Module, Any]:
    """Llama-3-8B (bf16) built on meta, bound to a VMM arena on ``device``, dummy-filled
    (norms 1, the rest uniform ±1e-3, as ``--load-format dummy``); returns (model, memory)."""
    from attention.backends import TorchBackend
    from workers.config import ModelConfig
    from workers.kv_pool import KVBlockFormat
    from workers.memory import WorkerMemory
    from workers.models.llama import LlamaModel

    cfg = ModelConfig.from_dir(MODEL)
    with torch.device("meta"):
        model = LlamaModel(cfg, TorchBackend())
    fmt = KVBlockFormat(cfg.num_layers, 16, cfg.num_kv_heads, cfg.head_dim, torch.bfloat16)
    memory = WorkerMemory.for_model(model, torch.bfloat16, fmt, KV_CHUNKS, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.data.fill_(1.0)
        else:
            p.data.uniform_(-1e-3, 1e-3, generator=gen)
    torch.cuda.synchronize(device)
    return model, memory


def _checksum(memory: Any) -> int:
    """Wrapping int64 sum of the dropped layers' bytes (order-independent modulo 2**64)."""
    return int(memory.arena.layer_bytes(*DROP).view(torch.int64).sum())


SCENARIOS = (
    ("eager", False, False, False),
    ("lazy", True, False, False),
    ("lazy_flushed", True, True, False),
    ("premapped", True, False, True),
)
"""(name, lazy, flush between drop and restore, premap before the drop): eager unmaps at
once; lazy leaves aliases that the restore adopts back; lazy_flushed is a lazy drop whose
aliases an idle ``flush`` removed, so the restore maps every chunk again; premapped maps the
layers into the KV range while idle (``premap`` time), so the drop itself calls nothing."""


def _cycle(
    memory: Any, scenario: tuple[str, bool, bool, bool], restore: Callable[[bool], Any]
) -> dict:
    """One drop + restore of ``DROP``; returns its times (ms) and driver calls. Leaves no
    stale alias."""
    _, lazy, flush, premap = scenario
    times: dict[str, float] = {}
    if premap:
        times["premap"] = _timed_ms(lambda: memory.premap_drop(*DROP))
    torch.cuda.synchronize()
    stats = memory.drop_layers(*DROP, lazy=lazy)
    times.update(drop=stats.total_s * 1e3, drop_usable=stats.usable_s * 1e3)
    times["drop_driver_calls"] = stats.driver_calls
    if flush:
        times["flush_after_drop"] = _timed_ms(memory.flush)
    memory.kv.kv_cache.fill_(0.5)  # the borrowed chunks really serve as KV
    calls = sum(memory.backend.calls.values())
    times["restore"] = _timed_ms(lambda: restore(lazy))
    times["restore_driver_calls"] = sum(memory.backend.calls.values()) - calls
    times["flush_after_restore"] = _timed_ms(memory.flush)
    times["nbytes"] = stats.nbytes
    return times


def _medians(rounds: list[dict]) -> dict:
    """``{scenario: {key: median}}`` over rounds of ``{scenario: {key: value}}``."""
    out: dict[str, dict[str, float]] = {}
    for name in rounds[0]:
        keys = rounds[0][name]
        out[name] = {k: statistics.median(r[name][k] for r in rounds) for k in keys}
    return out


def _single_gpu(repeats: int) -> dict:
    from workers.weight_arena import HostCopy

    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    _, memory = build_dummy_memory(device)
    out: dict[str, Any] = {
        "vmm_ops": _op_costs(memory.backend),
        "batched_unmap": memory.backend.batched_unmap,
    }
    host, before, blocks = HostCopy(memory.arena, *DROP), _checksum(memory), memory.kv.num_blocks
    rounds = []
    for _ in range(repeats):
        rounds.append({})
        for scenario in SCENARIOS:
            restore = lambda lazy: memory.restore_layers(*DROP, host, lazy=lazy)  # noqa: E731
            rounds[-1][scenario[0]] = _cycle(memory, scenario, restore)
            assert _checksum(memory) == before and memory.kv.num_blocks == blocks
    nbytes = memory.arena.layer_nbytes(*DROP)
    dropped = memory.kv.blocks_in(memory.kv.mapped_slots + memory.arena.num_layer_slots(*DROP))
    floor = _h2d_floor_ms(host.host, repeats)
    torch.cuda.empty_cache()  # the floor's device buffer
    memory.check_integrity()
    memory.close()
    out.update(
        nbytes=nbytes,
        slots_per_layer=memory.arena.num_layer_slots(DROP[0], DROP[0] + 1),
        kv_blocks_before_after_drop=[blocks, dropped],
        drop_target_ms=50.0,
        pcie_floor_ms=floor,
        pcie_floor_GBps=nbytes / floor / 1e6,
        restore_host_target_over_floor=1.2,
        scenarios=_medians(rounds),
    )
    for v in out["scenarios"].values():
        v["restore_over_floor"] = v["restore"] / floor
    return out


def _timed_ms(fn: Callable[[], Any]) -> float:
    """Host milliseconds of ``fn`` until the device is idle again."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def _h2d_floor_ms(host: torch.Tensor, repeats: int) -> float:
    """One pinned host-to-device copy of ``host`` into ordinary device memory (median ms)."""
    dst = torch.empty_like(host, device="cuda")
    dst.copy_(host, non_blocking=True)
    floor = statistics.median(
        _timed_ms(lambda: dst.copy_(host, non_blocking=True)) for _ in range(repeats)
    )
    return floor


def _op_costs(backend: Any, n: int = 256) -> dict:
    """µs per one-slot chunk of create, map (+ one access call per run), unmap (batched when
    the driver allows it, and chunk by chunk), release, for n chunks in one scratch range;
    and ``one_chunk_us``: the same ops, in µs in all, for one chunk of n slots."""
    from kernels.vmm import VirtualRange

    out: dict[str, Any] = {}

    def timed(key: str, fn: Callable[[], Any], per: int = n, into: dict = out) -> Any:
        t0 = time.perf_counter()
        r = fn()
        into[key] = round((time.perf_counter() - t0) * 1e6 / per, 2)
        return r

    rng = VirtualRange(backend, n, "scratch")
    chunks = timed("create_us", lambda: backend.create_chunks(n))
    for mode in sorted({backend.batched_unmap, False}, reverse=True):
        timed("map_and_access_us", lambda: rng.map(0, chunks))
        batched, backend.batched_unmap = backend.batched_unmap, mode
        timed("unmap_batched_us" if mode else "unmap_per_chunk_us", lambda: rng.unmap(0, n))
        backend.batched_unmap = batched
    timed("release_us", lambda: backend.release_chunks(chunks))
    one: dict[str, float] = {"slots": n}
    big = timed("create", lambda: backend.create_chunks(1, n), 1, one)
    timed("map_and_access", lambda: rng.map(0, big), 1, one)
    timed("unmap", lambda: rng.unmap(0, n), 1, one)
    timed("release", lambda: backend.release_chunks(big), 1, one)
    out["one_chunk_us"] = one
    rng.close()
    return out


# ------------------------------------------------------------------------------ 2 GPUs


def _peer_run(repeats: int) -> dict:
    import tempfile

    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_peer_worker, args=(tmp, repeats), nprocs=2, join=True)
        return json.loads((Path(tmp) / "peer.json").read_text())


def _peer_worker(rank: int, tmp: str, repeats: int) -> None:
    """Both GPUs build the same dummy model; GPU 0 drops layers 16..31 and restores them from
    GPU 1 (``PeerSource``) in each scenario, timed against one NCCL send/recv of the bytes."""
    import torch.distributed as dist

    from workers.weight_arena import PeerSource, send_layers

    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", init_method=f"file://{tmp}/init", rank=rank, world_size=2)
    _, memory = build_dummy_memory(device)
    before, nbytes = _checksum(memory), memory.arena.layer_nbytes(*DROP)
    rounds, floors = [], []
    for _ in range(repeats + 1):  # the first round warms NCCL up and is not counted
        rounds.append({})
        for scenario in SCENARIOS:
            dist.barrier()
            if rank == 0:
                restore = lambda lazy: memory.restore_layers(*DROP, PeerSource(1), lazy=lazy)  # noqa: E731
                rounds[-1][scenario[0]] = _cycle(memory, scenario, restore)
                assert _checksum(memory) == before
            else:
                send_layers(memory.arena, *DROP, dst=0)
                torch.cuda.synchronize()
        floors.append(_link_floor_ms(rank, nbytes))
    if rank == 0:
        floor = statistics.median(floors[1:])
        scenarios = _medians(rounds[1:])
        for v in scenarios.values():
            v["restore_over_floor"] = v["restore"] / floor
        result = {
            "nbytes": nbytes,
            "link_floor_ms": floor,
            "link_floor_GBps": nbytes / floor / 1e6,
            "restore_peer_target_over_floor": 2.0,
            "scenarios": scenarios,
        }
        (Path(tmp) / "peer.json").write_text(json.dumps(result))
    dist.barrier()
    memory.close()
    dist.destroy_process_group()


def _link_floor_ms(rank: int, nbytes: int) -> float:
    """One NCCL send (GPU 1) / recv (GPU 0) of ``nbytes`` between ordinary buffers."""
    import torch.distributed as dist

    buf = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dist.barrier()
    torch.cuda.synchronize()
    ms = _timed_ms(lambda: dist.recv(buf, src=1) if rank == 0 else dist.send(buf, dst=0))
    return ms
