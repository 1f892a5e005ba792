"""Pre-drop requests in a pipeline group: block accounting, the exchange plan, and remote
attention equal to local attention (workers/remote_attention.py)."""

from __future__ import annotations

import dataclasses
import random
import threading

import pytest
import torch

from attention.backends import TorchBackend
from attention.metadata import AttentionMetadata
from kernels.rope import rope_cos_sin_cache
from tests.workers.pipeline_helpers import LoopbackTransport
from workers.block_pool import BlockPool
from workers.remote_attention import (
    GroupKVManager,
    GroupLayout,
    LegacySeq,
    RemoteAttention,
    StepPlan,
)
from workers.request import Request, RequestStatus, SamplingParams
from workers.scheduler import ScheduledRequest, SchedulerOutput

BS = 4
LAYOUT = GroupLayout((0, 1), ((0, 3), (3, 5)))  # 5 layers, uneven like stories260K
EVEN = GroupLayout((0, 1), ((0, 2), (2, 4)))


def _request(rid: str, computed: int, blocks: list[int]) -> Request:
    r = Request(rid, list(range(1, computed + 2)), SamplingParams(), 64, eos_token_ids=[0])
    r.num_computed_tokens, r.block_ids, r.status = computed, list(blocks), RequestStatus.RUNNING
    return r


def _manager(layout: GroupLayout, blocks: int = 40, budget: int = 0) -> GroupKVManager:
    return GroupKVManager(
        BlockPool(blocks), BS, layout, layer_block_bytes=100, exchange_bytes_per_step=budget
    )


def test_reserved_ids_cover_the_l_layer_blocks_bytes_in_each_home_stage_view() -> None:
    even = _manager(EVEN)
    assert even.reserved_ids(0, [0, 3]) == [0, 1, 6, 7]  # g = 2: two stage blocks each
    uneven = _manager(LAYOUT)
    # home 0 keeps 3 of 5 layers: L-block b spans stage blocks [5b/3, 5(b+1)/3)
    assert uneven.reserved_ids(0, [0]) == [0, 1]
    assert uneven.reserved_ids(0, [1]) == [1, 2, 3]
    assert uneven.reserved_ids(1, [1]) == [2, 3, 4]  # home 1 keeps 2 of 5: units [5, 10)
    assert _manager(EVEN, blocks=5).reserved_ids(0, [2, 3]) == [4]  # ids past the pool: none


def test_adopt_reserves_then_exchange_moves_layer_by_layer_and_frees() -> None:
    kv = _manager(LAYOUT)
    a = _request("a", computed=6, blocks=[0, 1])  # 2 L-blocks on home 0
    kv.adopt_legacy(a, home=0)
    assert a.block_ids == [] and kv.pool.num_used == 4  # ids 0..3 alias a's bytes
    out = SchedulerOutput([ScheduledRequest(a, 1)])
    assert kv.allocate_slots(a, 1) == []  # 7 tokens fit its 8 L-layer slots: nothing new
    # budget 0: nothing over the link, so only the layers its home's stage keeps move (a
    # copy within worker 0, not counted against the link)
    copies = kv.plan_exchange(out)
    assert [(c.src_rank, c.dst_rank, c.src_layers, c.dst_layers) for c in copies] == [
        (0, 0, (0, 3), (0, 3))
    ]
    assert a.block_ids == [4, 5] and kv.legacy["a"].moved_upto == 3  # pipeline blocks now
    assert copies[0].src_blocks == (0, 1) and copies[0].dst_blocks == (4, 5)
    plan = kv.step_plan(out, copies)
    assert plan.legacy == (LegacySeq(0, 0, 3, (0, 1)),) and plan.seq_lens == (7,)
    copies = kv.plan_exchange(out)  # still one layer a step, over the budget
    assert [(c.dst_rank, c.src_layers, c.dst_layers) for c in copies] == [(1, (3, 4), (0, 1))]
    assert kv.legacy["a"].moved_upto == 4
    # the next token would pass its L-layer blocks: every remaining layer moves this step
    a.num_computed_tokens = 8
    assert kv.allocate_slots(a, 1) == [6]
    copies = kv.plan_exchange(SchedulerOutput([ScheduledRequest(a, 1)]))
    assert [(c.dst_rank, c.src_layers, c.dst_layers) for c in copies] == [(1, (4, 5), (1, 2))]
    assert "a" not in kv.legacy and kv.pool.num_used == 3  # reservation given back
    kv.free(a)
    assert kv.pool.num_used == 0
    kv.pool.check_integrity()


def test_budget_counts_the_bytes_each_worker_sends_and_receives_not_local_copies() -> None:
    kv = _manager(EVEN, budget=200)  # 2 layer-blocks of 100 bytes each way a step
    a, b, c = _request("a", 4, [0]), _request("b", 4, [1]), _request("c", 4, [2])
    kv.adopt_legacy(a, home=0)
    kv.adopt_legacy(b, home=1)
    kv.adopt_legacy(c, home=0)
    assert kv.pool.num_used == 6  # ids 0, 1 alias a on home 0; 2, 3 b on home 1; 4, 5 c
    kv.pool.check_integrity()
    copies = kv.plan_exchange(None)
    # a sends 2 layer-blocks 0 -> 1, b 2 the other way: both whole, each within its direction
    # (and their local halves free); c's layers for stage 1 would pass worker 0's sends, so
    # only its local layers move
    assert "a" not in kv.legacy and "b" not in kv.legacy and kv.legacy["c"].moved_upto == 2
    assert sorted((c.src_rank, c.dst_rank, c.src_layers) for c in copies) == [
        (0, 0, (0, 2)),
        (0, 1, (2, 4)),
        (1, 0, (0, 2)),
        (1, 1, (2, 4)),
    ]
    assert next(x for x in copies if x.src_rank == 0 and x.dst_rank == 0).request_ids == ("a", "c")
    kv.free(c)  # preempted or aborted before its KV moved: its reservation goes too
    assert kv.pool.num_used == 2 and not kv.legacy  # only a's and b's pipeline blocks are held
    with pytest.raises(ValueError, match="cannot reserve"):
        kv.pool.reserve([99])


def test_budget_bounds_what_a_worker_receives_from_several_homes() -> None:
    three = GroupLayout((0, 1, 2), ((0, 1), (1, 2), (2, 3)))
    kv = _manager(three, budget=100)
    a, b = _request("a", 4, [0]), _request("b", 4, [1])
    kv.adopt_legacy(a, home=1)
    kv.adopt_legacy(b, home=2)
    kv.plan_exchange(None)
    # a: layers 0 (to worker 0) and 2 (to worker 2) would send 200 from worker 1; layer 0
    # and its own layer 1 fit. b's layer 0 would be a second 100 into worker 0: it waits
    assert kv.legacy["a"].moved_upto == 2 and kv.legacy["b"].moved_upto == 0


def test_adopting_all_at_once_reserves_what_adopting_one_by_one_does() -> None:
    """A drop adopts its pre-drop requests in one call; ids shared by two requests' L-layer
    blocks (uneven layers) are held twice either way."""

    def requests() -> list[tuple[Request, int]]:
        a, b, c = _request("a", 6, [1, 0]), _request("b", 6, [2, 5]), _request("c", 3, [1])
        return [(a, 0), (b, 0), (c, 1)]

    one_by_one, at_once = _manager(LAYOUT), _manager(LAYOUT)
    for r, home in requests():
        one_by_one.adopt_legacy(r, home)
    at_once.adopt_all(requests())
    assert at_once.pool.ref_counts() == one_by_one.pool.ref_counts()
    # id 3 aliases a's block 1 and b's block 2 on home 0, and c's block 1 on home 1
    assert at_once.pool.ref_counts()[:6] == [1, 1, 2, 3, 2, 0]
    assert {rid: (lg.home, lg.blocks) for rid, lg in at_once.legacy.items()} == {
        "a": (0, (1, 0)),
        "b": (0, (2, 5)),
        "c": (1, (1,)),
    }
    assert at_once.allocate_slots(_request("d", 0, []), BS) == one_by_one.allocate_slots(
        _request("d", 0, []), BS
    )
    at_once.pool.check_integrity()


def _reserved_reference(layout: GroupLayout, home: int, blocks: list[int], size: int) -> list:
    """The ids aliasing L-layer ``blocks`` in ``home``'s stage view, id by id."""
    L, lh = layout.num_layers, layout.stage_layers(home)
    ids = {i for b in blocks for i in range(b * L // lh, -(-(b + 1) * L // lh)) if i < size}
    return sorted(ids)


@pytest.mark.parametrize("layout", [LAYOUT, EVEN, GroupLayout((0, 1, 2), ((0, 2), (2, 4), (4, 7)))])
def test_adopting_many_requests_reserves_each_ones_ids_ascending_on_random_blocks(
    layout: GroupLayout,
) -> None:
    """The drop's adoption finds every request's ids in one pass (ascending blocks skip the
    sort); on random blocks, ascending or not, each request's ids and the pool's reference
    counts equal an id-by-id reference."""
    rng = random.Random(len(layout.ranks))
    for trial in range(30):
        size = rng.randrange(1, 120)
        kv = _manager(layout, blocks=size)
        requests, counts = [], [0] * size
        for i in range(rng.randrange(1, 9)):
            blocks = rng.sample(range(60), rng.randrange(0, 12))
            if trial % 2:
                blocks.sort()  # a fresh pool's blocks: ascending
            home = rng.choice(layout.ranks)
            requests.append((_request(f"r{i}", 4 * len(blocks), blocks), home))
        expected = {}
        for r, home in requests:
            ids = _reserved_reference(layout, home, r.block_ids, size)
            expected[r.request_id] = (tuple(r.block_ids), ids)
            for i in ids:
                counts[i] += 1
        kv.adopt_all(requests)
        got = {rid: (lg.blocks, lg.reserved) for rid, lg in kv.legacy.items()}
        assert got == expected
        assert kv.pool.ref_counts() == counts
        kv.pool.check_integrity()


def _pipeline_request(kv: GroupKVManager, rid: str, computed: int) -> Request:
    """A request admitted after the drop: pipeline blocks for ``computed`` tokens."""
    r = _request(rid, computed, [])
    r.block_ids = kv.pool.allocate(kv.blocks_needed(computed))
    return r


def _tuples(copies) -> list[tuple]:
    return [(c.src_rank, c.dst_rank, c.src_layers, c.dst_layers) for c in copies]


def test_gather_moves_pipeline_kv_home_around_pipeline_blocks_and_grows_there() -> None:
    """A live restore (EVEN: L-block b on a home aliases stage ids 2b, 2b+1): one request a
    step (no budget) moves from both stages into L-layer blocks on its origin whose bytes no
    pipeline block uses; it then decodes as a pre-drop request and grows on its home."""
    kv = _manager(EVEN)
    p, q = _pipeline_request(kv, "p", 6), _pipeline_request(kv, "q", 8)
    assert (p.block_ids, q.block_ids) == ([0, 1], [2, 3])
    kv.begin_gather({0: 10, 1: 10}, {"p": 0, "q": 1})
    out = SchedulerOutput([ScheduledRequest(p, 1), ScheduledRequest(q, 1)])
    assert kv.allocate_slots(p, 1) == [] and kv.allocate_slots(q, 1) == [4]
    assert kv.plan_exchange(out) == []
    copies = kv.plan_gather(out)
    # L-blocks 0..2 on home 0 alias ids 0..5, ids 0..4 held by p and q: p goes to L-blocks 3, 4
    assert _tuples(copies) == [(0, 0, (0, 2), (0, 2)), (1, 0, (0, 2), (2, 4))]
    assert {(c.src_blocks, c.dst_blocks) for c in copies} == {((0, 1), (3, 4))}
    assert p.block_ids == [] and kv.is_home("p") and not kv.is_home("q")
    assert kv.legacy["p"].blocks == (3, 4) and kv.legacy["p"].reserved == [6, 7, 8, 9]
    assert kv.step_plan(out, [], copies).legacy == (LegacySeq(0, 0, 0, (3, 4)),)
    kv.pool.check_integrity()
    # next step: q (3 L-blocks for 10 tokens) onto its origin; ids 6..9 are p's reservation,
    # not a pipeline block, so home 1 may use them; ids 2, 3, 4 are q's own
    p.num_computed_tokens, q.num_computed_tokens = 7, 9
    out = SchedulerOutput([ScheduledRequest(p, 1), ScheduledRequest(q, 1)])
    assert kv.allocate_slots(p, 1) == [] and kv.allocate_slots(q, 1) == []
    copies = kv.plan_gather(out)
    assert {c.dst_rank for c in copies} == {1}
    assert kv.legacy["q"].blocks == (0, 3, 4)  # L-blocks 1, 2 alias ids 2..5: still q's
    assert {(c.src_blocks, c.dst_blocks) for c in copies} == {((2, 3, 4), (0, 3, 4))}
    assert kv.pool.num_used == 6 and len(kv.held_ids()) == 10  # reservations only, shared
    # p passes its 2 L-blocks: it grows on its home instead of moving forward
    p.num_computed_tokens = 8
    assert kv.allocate_slots(p, 1) == [] and kv.legacy["p"].blocks == (3, 4, 0)
    assert kv.plan_exchange(SchedulerOutput([ScheduledRequest(p, 1)])) == []
    kv.free(p)
    kv.free(q)
    assert kv.pool.num_used == 0
    kv.pool.check_integrity()


def test_gather_picks_another_home_when_the_origin_is_full_and_end_gather_stops() -> None:
    kv = _manager(EVEN)
    p, q = _pipeline_request(kv, "p", 8), _pipeline_request(kv, "q", 4)
    kv.begin_gather({0: 3, 1: 10}, {"p": 0})  # home 0: only L-block 2 is clear of ids 0..2
    out = SchedulerOutput([ScheduledRequest(p, 1), ScheduledRequest(q, 1)])
    kv.allocate_slots(p, 1)
    copies = kv.plan_gather(out)
    assert kv.legacy["p"].home == 1 and {c.dst_rank for c in copies} == {1}
    assert "q" not in kv.legacy  # one request a step
    kv.end_gather()
    assert kv.plan_gather(out) == []
    with pytest.raises(ValueError, match="gather homes"):
        kv.begin_gather({0: 3}, {})


@torch.inference_mode()
def test_remote_attention_equals_local_attention() -> None:
    """A pre-drop request homed on worker 1, at stage 0's layers 0..2: stage 0 sends q, k, v,
    worker 1 attends over its L-layer blocks and sends the output back. Each layer's output
    equals attention over the same KV held locally, and worker 1's cache gets the new K, V."""
    torch.manual_seed(0)
    heads, kv_heads, dim, layers = 4, 2, 8, 5
    backend, cos_sin = TorchBackend(), rope_cos_sin_cache(dim, 64, 10000.0, None)
    legacy = torch.randn(8, layers, 2, BS, kv_heads, dim)  # worker 1's L-layer view
    ref_cache = legacy.clone()
    blocks, ctx = (3, 5), 7  # 6 tokens cached + 1 new, at position 6
    positions = torch.tensor([ctx - 1])
    plan = StepPlan(legacy=(LegacySeq(0, 1, 0, blocks),), query_lens=(1,), seq_lens=(ctx,))
    links: dict = {}
    stage0 = torch.zeros(4, 3, 2, BS, kv_heads, dim)  # stage 0's own view: untouched
    meta = AttentionMetadata(
        slot_mapping=torch.tensor([-1]),
        block_tables=torch.tensor([list(blocks)], dtype=torch.int32),
        seq_lens=torch.tensor([ctx], dtype=torch.int32),
        query_start_loc=torch.tensor([0, 1], dtype=torch.int32),
        max_query_len=1,
        max_seq_len=ctx,
    )

    def router(me: int, view: torch.Tensor) -> RemoteAttention:
        t = LoopbackTransport(me, links, 16)
        return RemoteAttention(plan, me, LAYOUT, view, t, backend, cos_sin, (heads, kv_heads, dim))

    home, stage = router(1, legacy), router(0, torch.zeros_like(legacy))
    server = threading.Thread(target=torch.inference_mode()(home.serve), args=(0, torch.float32))
    server.start()
    for layer in range(3):
        q = torch.randn(1, heads, dim)
        k, v = torch.randn(1, kv_heads, dim), torch.randn(1, kv_heads, dim)
        out = stage.attend(layer, q, k, v, positions, stage0, meta)
        slot = torch.tensor([blocks[1] * BS + 2])  # position 6: block 5, offset 2
        qr, _ = backend.rope_and_write_kv(q, k, v, positions, cos_sin, ref_cache, layer, slot)
        ref = backend.attention(qr, ref_cache, layer, dataclasses.replace(meta, slot_mapping=slot))
        assert torch.allclose(out, ref, atol=1e-6), layer
    server.join(timeout=30)
    assert not server.is_alive()
    assert (home.counters["served"], stage.counters["sent"]) == (3, 3)
    assert torch.equal(legacy, ref_cache)  # the home's cache holds the new K and V
    assert not stage0.any()  # nothing went to stage 0's own KV


def test_fence_waits_for_the_tail_to_be_free_then_keeps_pipeline_blocks_out_of_it() -> None:
    """A restore fences the group-pool ids from the first whose bytes may lie in the lent KV
    tail before it refills weights there: refused while a pipeline block lies there (a
    reservation there does not count); once fenced, allocations come from below only, also
    after a reservation there ends; a refused restore gives the ids back."""
    kv = _manager(LAYOUT, blocks=20)
    a = _request("a", computed=6, blocks=[3, 4])
    kv.adopt_legacy(a, home=0)  # home 0 keeps 3 of 5 layers: reserves ids 5..8
    b = _request("b", computed=0, blocks=[])
    assert kv.allocate_slots(b, 4 * BS) == [0, 1, 2, 3]
    c = _request("c", computed=0, blocks=[])
    assert kv.allocate_slots(c, 4 * BS) == [4, 9, 10, 11]
    assert not kv.fence(5) and kv.fenced == [] and kv.pool.num_used == 12
    kv.free(c)
    assert kv.fence(5) and kv.fence(5)  # twice: a no-op
    assert kv.fenced == list(range(5, 20)) and kv.pool.num_used == 4 + 15
    assert sorted(set(kv.held_ids())) == list(range(5, 20))
    kv.free(a)  # its reservations end, but ids 5..8 stay fenced
    assert kv.allocate_slots(_request("d", 0, []), BS) == [4]
    assert kv.allocate_slots(_request("e", 0, []), BS) is None  # nothing free below 5
    kv.unfence()
    assert kv.fenced == [] and kv.pool.num_used == 5  # b's and d's blocks
    kv.pool.check_integrity()


def test_link_budget_lets_a_home_copy_its_own_layers_after_its_sends_are_spent() -> None:
    """A span that crosses no link is free even once its home has sent past the budget (one
    forced layer a step can overspend it): the home's own layers still move."""
    from workers.remote_attention import _LinkBudget

    link = _LinkBudget(EVEN, budget=0)
    link.spend(1, 0, 1, per_layer=100)  # the step's forced layer: home 1 sends 100 to 0
    assert link.layers_within(1, 2, 100) == 2  # home 1's own layers 2, 3: no link bytes
    assert link.layers_within(1, 1, 100) == 0  # layer 1 would cross: nothing
    assert link.layers_within(0, 0, 100) == 2  # home 0: its own 0, 1; 2 would cross
