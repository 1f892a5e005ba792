"""A restore's weight copies (workers/weight_exchange.py): the plan every member walks, the
leader's per-step budget while the group serves, and why a refill before the restore keeps its
bytes on VMM memory (the lazy drop's aliases, adopted back in place)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from kernels.vmm import ChunkBackend
from kernels.vmm_emulated import EmulatedBackend
from tests.workers.test_kv_pool import CHUNK, FMT
from workers.memory import WorkerMemory
from workers.stage_memory import VmmStageMemory
from workers.weight_arena import ArenaLayout
from workers.weight_exchange import WeightCopy, WeightPrefetch, owned_regions, plan_restore

F32 = torch.float32


@pytest.fixture
def backend() -> Iterator[ChunkBackend]:
    b = EmulatedBackend(CHUNK)
    yield b
    b.close()


def memory_of(backend: ChunkBackend, num_layers: int = 4) -> WorkerMemory:
    """A model's arena as ``layout_for_model`` lays it out: embedding (-1), ``num_layers``
    layers of 2 chunks each, head (``num_layers``); 2 chunks of KV."""
    groups = [("embed", -1, [("embed.weight", (1000,), F32)])]
    groups += [(f"layer.{i}", i, [(f"layers.{i}.w", (96 * 256,), F32)]) for i in range(num_layers)]
    groups += [("head", num_layers, [("head.weight", (1000,), F32)])]
    return WorkerMemory(backend, ArenaLayout.build(groups, CHUNK), FMT, 2, 64)


def test_plan_restore_sends_each_kept_region_to_every_other_stage_last_first() -> None:
    assert owned_regions(((0, 3), (3, 5)), 5) == [(-1, 3), (3, 6)]
    assert plan_restore((0, 1), ((0, 3), (3, 5)), 5) == [
        *(WeightCopy(1, 0, j) for j in (5, 4, 3)),  # head and layers 4, 3 from stage 1
        *(WeightCopy(0, 1, j) for j in (2, 1, 0, -1)),  # layers 2..0 and the embedding
    ]
    three = plan_restore((4, 5, 6), ((0, 2), (2, 4), (4, 5)), 5)
    assert three[:2] == [WeightCopy(6, 4, 5), WeightCopy(6, 5, 5)]  # to both other stages
    assert len(three) == 2 * 7 and {c.region for c in three} == set(range(-1, 6))


def test_prefetch_takes_a_budget_per_link_in_plan_order() -> None:
    """Regions of 3, 1 and 5 bytes: each link carries up to 4 bytes a step, at least one
    region, and a region too big for what is left waits for the next step with those after it
    (each link's copies stay in plan order)."""
    sizes = {5: 3, 4: 1, 3: 5, 2: 5, 1: 1}
    copies = [WeightCopy(1, 0, j) for j in (5, 4, 3)] + [WeightCopy(0, 1, j) for j in (2, 1)]
    p = WeightPrefetch(copies, sizes.__getitem__, bytes_per_step=4, first_tail_block=7)
    assert p.bytes_left == 15
    assert p.take() == [copies[0], copies[1], copies[3]]  # 3 + 1 on 1 -> 0; 5 alone on 0 -> 1
    assert p.take() == [copies[2], copies[4]]  # 5 alone on 1 -> 0; 1 on 0 -> 1
    assert p.take() == [] and p.pending == [] and p.bytes_left == 0
    assert p.done == [copies[i] for i in (0, 1, 3, 2, 4)] and p.steps == 2


def test_a_refill_through_a_dropped_layers_alias_survives_the_lazy_restore(
    backend: ChunkBackend,
) -> None:
    """After a lazy drop every dropped region's chunk is still mapped at its weight address
    and the restore adopts it there: bytes written through the weight views before the
    restore (while the chunks are KV tail that nobody uses) are the restored layers' bytes.
    A stage that drops two runs restores them last first, each in place."""
    mem = memory_of(backend)
    mem.drop_layers(-1, 1)  # a middle stage of 3 keeping [1, 3): embedding and layer 0 ...
    mem.drop_layers(3, 5)  # ... layer 3 and the head
    runs = [(3, 5), (-1, 1)]
    assert mem.restores_in_place(runs) == {-1, 0, 3, 4}
    mem.kv.prefix_bytes()[2 * CHUNK :].fill_(7)  # the tail, used as KV
    for j in (-1, 0, 3, 4):
        mem.arena.layer_bytes(j, j + 1).fill_(j + 2)  # the refill, through the aliases
    for start, end in runs:
        mem.restore_layers(start, end, None)
    for j in (-1, 0, 3, 4):
        assert torch.all(mem.arena.layer_bytes(j, j + 1) == j + 2)
    mem.check_integrity()
    mem.close()


def test_no_region_restores_in_place_once_the_aliases_are_unmapped(
    backend: ChunkBackend,
) -> None:
    """``flush`` unmaps the lazy aliases: the restore would map the tail's chunks afresh,
    so a refill before it would be lost, and the stage memory refuses to run one."""
    mem = memory_of(backend)
    mem.drop_layers(2, 5)
    assert mem.restores_in_place([(2, 5)]) == {2, 3, 4}
    mem.flush()
    assert mem.restores_in_place([(2, 5)]) == set()
    stage = VmmStageMemory(mem)  # stage 0 of ((0, 2), (2, 4)): it dropped [2, 5)
    with pytest.raises(RuntimeError, match=r"regions \[4\] are refilled before the restore"):
        stage.prefetch([WeightCopy(1, 0, 4)], (0, 1), ((0, 2), (2, 4)), 0, transport=None)
    mem.close()
