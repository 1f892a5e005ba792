"""Piecewise CUDA graphs for prefill and mixed steps (workers/piecewise_graphs.py).

On CPU the pieces run eagerly over the static buffers (``replay_eagerly``), which checks what a
graph records: the split of each layer at attention, the residual stream carried between
pieces, padding rows that write no KV, and stages that take activations. The ``gpu`` tests
capture real graphs and compare engines' tokens with and without them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.workers.test_cuda_graphs import by_slot, gpu, random_prompts
from workers.config import CacheConfig, EngineConfig, SchedulerConfig
from workers.engine import Engine, RequestSpec
from workers.model_runner import ModelRunner
from workers.piecewise_graphs import PiecewiseGraphs, piecewise_max_tokens, piecewise_sizes
from workers.pipeline import run_stage
from workers.request import Request, SamplingParams
from workers.scheduler import ScheduledRequest, SchedulerOutput

CPU = torch.device("cpu")
GREEDY = SamplingParams(temperature=0.0)
BLOCKS = 32


@pytest.mark.parametrize(
    ("max_tokens", "expected"),
    [
        (2048, [16, 32, 64, 96, 128, 192, 256, 320, 384, 448, 512, 640, 768, 896, 1024]),
        (1024, [16, 32, 64, 96, 128, 192, 256, 320, 384, 448, 512, 640, 768, 896, 1024]),
        (600, [16, 32, 64, 96, 128, 192, 256, 320, 384, 448, 512, 600]),
        (512, [16, 32, 64, 96, 128, 192, 256, 320, 384, 448, 512]),
        (300, [16, 32, 64, 96, 128, 192, 256, 300]),
        (16, [16]),
        (5, [5]),
    ],
)
def test_piecewise_sizes_stop_at_the_step_budget_and_at_1024(
    max_tokens: int, expected: list[int]
) -> None:
    assert piecewise_sizes(max_tokens) == expected
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        piecewise_sizes(0)


@pytest.mark.parametrize(
    ("batched", "pipeline", "model_max", "stage_max"),
    [
        (8192, None, 512, 1024),  # the defaults: a stage replays its 1,024-token micro-batches
        (8192, 4096, 512, 1024),
        (8192, 600, 512, 600),
        (300, None, 300, 300),
    ],
)
def test_a_stage_captures_up_to_its_micro_batch_budget_and_a_whole_model_up_to_512(
    batched: int, pipeline: int | None, model_max: int, stage_max: int
) -> None:
    sched = SchedulerConfig(
        max_num_batched_tokens=batched, pipeline_max_num_batched_tokens=pipeline
    )
    assert piecewise_max_tokens(sched, stage=False) == model_max
    assert piecewise_max_tokens(sched, stage=True) == stage_max


def runner_for(model_dir: Path, layer_range: tuple[int, int] | None = None) -> ModelRunner:
    cfg = EngineConfig(
        model_path=str(model_dir),
        dtype="float32",
        cache=CacheConfig(block_size=4, num_kv_blocks=BLOCKS),
        scheduler=SchedulerConfig(max_num_seqs=8, max_model_len=96),
    )
    runner = ModelRunner(cfg, CPU, layer_range)
    runner.allocate_kv_cache(BLOCKS)
    torch.manual_seed(0)
    runner.kv_cache.normal_()  # live KV everywhere: a stray write or read would show
    return runner


def mixed_step() -> SchedulerOutput:
    """A prefill chunk (tokens 4..10 of a 14-token prompt, over 4 cached ones), a whole
    9-token prompt and two decodes: 18 tokens, padded to 32."""
    specs = [  # (prompt, computed, new, blocks)
        (list(range(100, 114)), 4, 7, [3, 8, 12, 20]),
        (list(range(200, 209)), 0, 9, [1, 5, 9]),
        ([1, 403, 407, 261, 378], 4, 1, [0, 6]),
        ([1, 291, 376], 2, 1, [30]),
    ]
    scheduled = []
    for i, (prompt, computed, new, blocks) in enumerate(specs):
        req = Request(f"r{i}", prompt, GREEDY, 8, frozenset())
        req.num_computed_tokens = computed
        req.block_ids = blocks
        scheduled.append(ScheduledRequest(req, new))
    return SchedulerOutput(scheduled=scheduled)


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("layer_range", [None, (0, 2), (2, 5)])
def test_pieces_equal_the_eager_forward_and_write_only_real_slots(
    stories_dir: Path, layer_range: tuple[int, int] | None
) -> None:
    """A mixed step of 18 tokens through the pieces at size 32 (run as a graph records them)
    equals the model's eager forward: the whole model, a first stage (hidden and residual out)
    and a last stage (activations in). Every slot the eager step wrote holds the same KV after
    the pieces, and no other slot changed (the 14 padding rows wrote nothing), nor does one
    when a 2-token step follows over the same buffers."""
    runner = runner_for(stories_dir, layer_range)
    model, step = runner.model, mixed_step()
    inputs = runner.prepare(step)
    first = {"input_ids": inputs.input_ids} if model.is_first else {}
    n, hidden_size = inputs.positions.shape[0], runner.model_config.hidden_size
    torch.manual_seed(1)
    received = None if model.is_first else torch.randn(2, n, hidden_size)
    kv_before = runner.kv_cache.clone()
    with torch.inference_mode():
        if model.is_first:
            eager = run_stage(model, runner.kv_cache, None, positions=inputs.positions,
                              meta=inputs.meta, **first)  # fmt: skip
        else:
            x = _stage_inputs(inputs, received)
            eager = run_stage(model, runner.kv_cache, x)
        eager = tuple(t.clone() for t in eager)
    kv_eager = runner.kv_cache.clone()
    runner.kv_cache.copy_(kv_before)
    pieces = PiecewiseGraphs(model, runner.kv_cache, 64, replay_eagerly=True)
    assert pieces.size_for(n) == 32 and pieces.num_pieces == model.end - model.start + 1
    hidden_in = residual_in = None
    if received is not None:
        hidden_in, residual_in = received
    out = pieces.run(inputs.meta, inputs.positions, first.get("input_ids"), hidden_in, residual_in)
    assert pieces.num_runs == 1 and out[0].shape == (n, hidden_size)
    for got, want in zip(out, eager, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    slots = inputs.meta.slot_mapping
    untouched = torch.ones(BLOCKS * 4, dtype=torch.bool)
    untouched[slots] = False
    now, before, want = by_slot(runner.kv_cache), by_slot(kv_before), by_slot(kv_eager)
    assert torch.equal(now[untouched], before[untouched])
    torch.testing.assert_close(now[slots], want[slots], atol=1e-5, rtol=1e-5)
    # a smaller step next: rows 2..15 still hold the first step's slots, which must not write
    small = runner.prepare(SchedulerOutput(scheduled=step.scheduled[2:]))
    kv_before = runner.kv_cache.clone()
    acts = (None, None) if model.is_first else torch.randn(2, 2, hidden_size)
    pieces.run(small.meta, small.positions, small.input_ids, *acts)
    untouched = torch.ones(BLOCKS * 4, dtype=torch.bool)
    untouched[small.meta.slot_mapping] = False
    assert torch.equal(by_slot(runner.kv_cache)[untouched], by_slot(kv_before)[untouched])


def _stage_inputs(inputs, received: torch.Tensor):
    from attention.transport import StageInputs

    return StageInputs(received[0], received[1], inputs.positions, inputs.meta, None)


@pytest.mark.usefixtures("one_torch_thread")
def test_pieces_reject_steps_they_do_not_hold(stories_dir: Path) -> None:
    runner = runner_for(stories_dir, (2, 5))
    pieces = PiecewiseGraphs(runner.model, runner.kv_cache, 16, replay_eagerly=True)
    assert pieces.size_for(17) is None and pieces.size_for(0) is None
    inputs = runner.prepare(mixed_step())  # 18 tokens
    with pytest.raises(ValueError, match="18 tokens fits no captured size"):
        pieces.run(inputs.meta, inputs.positions)
    small = runner.prepare(SchedulerOutput(scheduled=mixed_step().scheduled[2:]))
    with pytest.raises(ValueError, match="a later stage needs hidden and residual of 2 tokens"):
        pieces.run(small.meta, small.positions, input_ids=small.input_ids)


# --- GPU: real graphs -----------------------------------------------------------------------


def _engine(model_dir: Path, budget: int, **engine: object) -> Engine:
    cfg = EngineConfig(
        model_path=str(model_dir),
        dtype="float32",
        cache=CacheConfig(block_size=16, num_kv_blocks=1024),
        scheduler=SchedulerConfig(max_num_seqs=32, max_num_batched_tokens=budget),
        **engine,
    )
    return Engine(cfg, torch.device("cuda"))


@gpu
def test_chunked_prefill_through_pieces_gives_the_eager_engines_tokens(stories_dir: Path) -> None:
    """An engine whose step budget (200 tokens) chunks every prompt runs its prefill and mixed
    steps through captured pieces; 24 requests' greedy tokens equal an eager engine's."""
    prompts = random_prompts(24, 512, 180, seed=3)
    tokens = []
    for eager in (False, True):
        engine = _engine(stories_dir, 200, enforce_eager=eager)
        pieces = None if eager else engine.runner.cuda_graphs.piecewise
        assert eager or pieces.sizes[-1] == 200
        for i, p in enumerate(prompts):
            engine.add_request(RequestSpec(str(i), p, GREEDY, 24))
        out: dict[str, list[int]] = {}
        while engine.has_work:
            for o in engine.step():
                out.setdefault(o.request_id, []).extend(o.new_token_ids)
        assert eager or pieces.num_runs > 10
        tokens.append(out)
    assert tokens[0] == tokens[1] and len(tokens[0]) == 24
