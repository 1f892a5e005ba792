"""Incremental decode inputs: persistent block-table rows and the packed step buffer, on CPU.

The randomized test drives a real scheduler (admissions, chunked prefill, preemptions, aborts,
block-boundary crossings, and block ids rewritten in place and by replacement, as a KV
evacuation does) and checks every decode-only step's packed inputs against a from-scratch
build from the requests' state.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from workers.block_pool import BlockPool, KVCacheManager
from workers.config import SchedulerConfig
from workers.decode_inputs import BlockTableRows, PackedLayout, StaticDecodeInputs
from workers.request import Request, RequestStatus, SamplingParams
from workers.scheduler import ScheduledRequest, Scheduler, SchedulerOutput

CPU = torch.device("cpu")
BLOCK_SIZE = 4
WIDTH = 16  # blocks per sequence: max_model_len 64 / BLOCK_SIZE
EOS = frozenset({2})


def request(rid: str, blocks: list[int]) -> Request:
    req = Request(rid, [1, 2, 3], SamplingParams(temperature=0.0), 8, frozenset())
    req.block_ids = blocks
    return req


def test_layout_offsets_are_aligned_and_sized() -> None:
    layout = PackedLayout(batch=3, width=5)
    assert (layout.seq_lens_offset, layout.table_offset) == (72, 88)  # 84 rounded up to 88
    assert layout.nbytes == 88 + 4 * 3 * 5
    assert PackedLayout(batch=4, width=5).table_offset == 112


def test_rows_are_kept_extended_and_rewritten() -> None:
    rows = BlockTableRows(num_rows=4, width=6)
    a, b = request("a", [5, 3]), request("b", [1])
    assert rows.rows_for([a, b]) == [0, 1]
    assert rows.table[0, :2].tolist() == [5, 3] and rows.lengths[:2].tolist() == [2, 1]
    assert rows.num_writes == 2
    assert rows.rows_for([b, a]) == [1, 0]  # unchanged: no write
    assert rows.num_writes == 2
    a.block_ids.append(9)  # crossed a block boundary: only the new id is written
    rows.table[0, :2] = -7  # (so a full rewrite would show)
    rows.rows_for([a])
    assert rows.table[0, :3].tolist() == [-7, -7, 9] and rows.lengths[0] == 3
    a.block_ids = [4, 8]  # preempted and readmitted, or moved by a transition: rewritten
    rows.rows_for([a])
    assert rows.table[0, :2].tolist() == [4, 8] and rows.lengths[0] == 2
    a.block_ids[0] = 2  # rewritten in place
    rows.rows_for([a])
    assert rows.table[0, :2].tolist() == [2, 8]
    assert rows.num_writes == 5


def test_rows_of_requests_gone_from_the_steps_are_reclaimed_when_full() -> None:
    rows = BlockTableRows(num_rows=2, width=4)
    a, b, c = request("a", [1]), request("b", [2]), request("c", [3])
    assert rows.rows_for([a, b]) == [0, 1]
    assert rows.rows_for([a, c]) == [0, 1]  # b's row reclaimed for c
    assert rows.table[1, 0] == 3
    with pytest.raises(ValueError, match="exceeds 2 rows"):
        rows.rows_for([a, b, c])
    with pytest.raises(ValueError, match="5 blocks exceed"):
        rows.rows_for([request("d", [1, 2, 3, 4, 5])])


def expected_fields(out: SchedulerOutput) -> dict[str, list[int]]:
    """The step's token ids, positions, slots and context lengths built from scratch."""
    reqs = [(s.request, s.request.num_computed_tokens) for s in out.scheduled]
    return {
        "input_ids": [r.token_id(c) for r, c in reqs],
        "positions": [c for _, c in reqs],
        "slot_mapping": [
            r.block_ids[c // BLOCK_SIZE] * BLOCK_SIZE + c % BLOCK_SIZE for r, c in reqs
        ],
        "seq_lens": [c + 1 for _, c in reqs],
    }


def check_step(inputs: StaticDecodeInputs, out: SchedulerOutput, padded: int) -> None:
    f = inputs.fields(padded)
    n = len(out.scheduled)
    pad = {"input_ids": 0, "positions": 0, "slot_mapping": -1, "seq_lens": 0}
    for name, values in expected_fields(out).items():
        assert getattr(f, name).tolist() == values + [pad[name]] * (padded - n), name
    for i, s in enumerate(out.scheduled):
        r = s.request
        used = -(-(r.num_computed_tokens + 1) // BLOCK_SIZE)  # blocks the kernel reads
        assert f.block_tables[i, :used].tolist() == r.block_ids[:used]


def evacuate(sched: Scheduler, rng: random.Random) -> int:
    """Moves the used blocks of the pool's upper half below it (as a KV shrink does) and
    rewrites the running requests' block ids, in place or by replacement; returns how many
    requests it touched."""
    pool = sched.kv.pool
    moved = pool.evacuate(pool.num_blocks // 2)
    if not moved:
        return 0
    touched = 0
    for r in sched.running:
        if not any(b in moved for b in r.block_ids):
            continue
        touched += 1
        if rng.random() < 0.5:
            r.block_ids = [moved.get(b, b) for b in r.block_ids]
        else:
            for i, b in enumerate(r.block_ids):
                r.block_ids[i] = moved.get(b, b)
    return touched


def test_incremental_inputs_equal_a_from_scratch_build_over_a_random_run() -> None:
    rng = random.Random(0)
    sizes = [1, 2, 4, 8]
    config = SchedulerConfig(max_num_batched_tokens=6, max_num_seqs=8)
    sched = Scheduler(config, KVCacheManager(BlockPool(40), BLOCK_SIZE), max_model_len=64)
    inputs = StaticDecodeInputs(8, WIDTH, BLOCK_SIZE, CPU)
    seen = {"decode_steps": 0, "rows_loaded": 0, "aborts": 0, "evacuated": 0, "non_sampling": 0}
    next_id = 0
    for _ in range(1500):
        if rng.random() < 0.3 and len(sched.waiting) < 6:
            prompt = [rng.randrange(3, 500) for _ in range(rng.randint(1, 20))]
            sched.add(Request(str(next_id), prompt, SamplingParams(), rng.randint(1, 40), EOS))
            next_id += 1
        if rng.random() < 0.03 and sched.running:
            sched.abort(rng.choice(sched.running).request_id)
            seen["aborts"] += 1
        if rng.random() < 0.02:
            seen["evacuated"] += evacuate(sched, rng)
        out = sched.schedule()
        n = len(out.scheduled)
        if n and all(s.num_new_tokens == 1 for s in out.scheduled):
            padded = next(s for s in sizes if s >= n)
            inputs.load(out.scheduled, padded)
            check_step(inputs, out, padded)
            seen["decode_steps"] += 1
            seen["rows_loaded"] += n
            seen["non_sampling"] += sum(not s.samples for s in out.scheduled)
        sampled = {s.request.request_id: rng.randrange(3, 500) for s in out.scheduled if s.samples}
        sched.update(out, sampled)
    assert all(r.status is RequestStatus.RUNNING for r in sched.running)
    assert seen["decode_steps"] > 300 and seen["aborts"] > 10 and seen["evacuated"] > 3
    assert seen["non_sampling"] > 0  # a 1-token prefill chunk rides in a decode-only step
    assert sched.num_preemptions > 10
    # Incremental: far fewer row writes than rows loaded (new blocks, admissions, rewrites).
    assert inputs.rows.num_writes < seen["rows_loaded"] / 2


def test_a_host_buffer_reused_across_sizes_never_leaks_a_larger_steps_rows() -> None:
    inputs = StaticDecodeInputs(4, WIDTH, BLOCK_SIZE, CPU)
    reqs = [request(str(i), [10 + i, 20 + i]) for i in range(4)]
    for i, r in enumerate(reqs):
        r.prompt_token_ids = list(range(5 + i))
        r.num_computed_tokens = 4 + i
    big = SchedulerOutput(scheduled=[ScheduledRequest(r, 1) for r in reqs])
    inputs.load(big.scheduled, 4)
    check_step(inputs, big, 4)
    small = SchedulerOutput(scheduled=big.scheduled[2:3])
    inputs.load(small.scheduled, 2)
    check_step(inputs, small, 2)
    assert np.array_equal(inputs.rows.lengths[:4], [2, 2, 2, 2])
