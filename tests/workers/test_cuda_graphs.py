"""CUDA graphs for decode: bucketing and static inputs on CPU, replays against eager on a GPU.

CPU tests cover the pure pieces (captured sizes, padding, which steps replay, the static
buffers) and the forward a graph records, run eagerly through the Triton interpreter. The
``gpu`` tests capture real graphs and check greedy outputs against eager and the golden file.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from coordinator.cli import add_engine_args, engine_config
from tests.workers.engine_helpers import run_to_completion, write_dummy_gqa_config
from workers.config import CacheConfig, EngineConfig, SchedulerConfig
from workers.cuda_graphs import (
    CudaGraphRunner,
    DecodeOutputs,
    capture_sizes,
    graph_blocker,
    graph_key,
    padded_batch_size,
    record,
    replay_size,
)
from workers.decode_inputs import StaticDecodeInputs
from workers.engine import Engine, RequestSpec
from workers.model_runner import ModelRunner
from workers.request import Request, SamplingParams
from workers.scheduler import ScheduledRequest, SchedulerOutput

CPU = torch.device("cpu")
CUDA = torch.device("cuda")
GREEDY = SamplingParams(temperature=0.0)
SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256]


def gpu(test: Callable) -> Callable:
    """Marks a test ``gpu`` and skips it where no CUDA device is present (also when a plain
    ``-m "not slow"`` overrides the default ``-m "not gpu"``)."""
    skip = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
    return pytest.mark.gpu(skip(test))


# --- CPU: bucketing and padding -------------------------------------------------------------


@pytest.mark.parametrize(
    ("max_num_seqs", "max_batched", "expected"),
    [
        (256, 2048, SIZES),
        (512, 8192, SIZES),
        (100, 2048, [1, 2, 4, 8, 16, 32, 64, 100]),
        (256, 48, [1, 2, 4, 8, 16, 32, 48]),
        (1, 2048, [1]),
    ],
)
def test_capture_sizes_stop_at_the_largest_decode_batch(
    max_num_seqs: int, max_batched: int, expected: list[int]
) -> None:
    assert capture_sizes(max_num_seqs, max_batched) == expected


@pytest.mark.parametrize(
    ("n", "padded"), [(1, 1), (2, 2), (3, 4), (37, 64), (64, 64), (129, 256), (256, 256)]
)
def test_padded_batch_size_is_the_next_captured_size(n: int, padded: int) -> None:
    assert padded_batch_size(n, SIZES) == padded


def test_padded_batch_size_beyond_the_largest_is_none() -> None:
    assert padded_batch_size(257, SIZES) is None
    with pytest.raises(ValueError, match="num_seqs must be >= 1"):
        padded_batch_size(0, SIZES)


@pytest.mark.parametrize(
    ("query_lens", "size"),
    [([1, 1, 1], 4), ([1] * 37, 64), ([1, 5], None), ([3], None), ([1] * 300, None), ([], None)],
)
def test_only_decode_only_steps_that_fit_replay(query_lens: list[int], size: int | None) -> None:
    assert replay_size(query_lens, SIZES) == size


@pytest.mark.parametrize(
    ("device", "eager", "backend", "full", "reason"),
    [
        (CUDA, False, "triton", True, None),
        (CUDA, True, "triton", True, "enforce_eager"),
        (CPU, False, "triton", True, "device is cpu"),
        (CUDA, False, "torch", True, "graphs need 'triton'"),
        (CUDA, False, "triton", False, "pipeline stage"),
    ],
)
def test_graph_blocker_names_why_a_runner_stays_eager(
    device: torch.device, eager: bool, backend: str, full: bool, reason: str | None
) -> None:
    got = graph_blocker(device, eager, backend, full)
    assert got is None if reason is None else reason in got


def test_static_inputs_load_pads_with_skipped_slots_and_empty_contexts() -> None:
    inputs = StaticDecodeInputs(max_batch=8, max_blocks_per_seq=4, block_size=4, device=CPU)
    step = decode_at([[11], [12], [13]], [5, 0, 8], [[5, 3], [1], [2, 7, 8]])
    inputs.load(step.scheduled, 4)
    f = inputs.fields(4)
    assert f.input_ids.tolist() == [11, 12, 13, 0]
    assert f.positions.tolist() == [5, 0, 8, 0]
    assert f.slot_mapping.tolist() == [13, 4, 32, -1]  # block 3 offset 1, block 1, block 8
    assert f.seq_lens.tolist() == [6, 1, 9, 0]
    assert f.block_tables[:3, :3].tolist() == [[5, 3, 0], [1, 0, 0], [2, 7, 8]]
    assert inputs.query_start_loc.tolist() == list(range(9))
    # A smaller step uses its own layout at the buffer's start; columns past its widest
    # context keep stale ids, never read (context lengths bound what the kernel reads).
    inputs.load(decode_at([[40]], [3], [[4]]).scheduled, 2)
    f = inputs.fields(2)
    assert f.slot_mapping.tolist() == [19, -1]
    assert f.seq_lens.tolist() == [4, 0]
    assert f.block_tables[0, 0] == 4
    meta = inputs.metadata(2, num_splits=3)
    assert (meta.num_seqs, meta.max_query_len, meta.decode_num_splits) == (2, 1, 3)
    assert meta.block_tables.data_ptr() == f.block_tables.data_ptr()
    assert meta.block_tables.shape == (2, 4) and meta.max_seq_len == 16


def test_static_inputs_pad_empties_a_size() -> None:
    inputs = StaticDecodeInputs(max_batch=4, max_blocks_per_seq=2, block_size=4, device=CPU)
    inputs.load(decode_at([[7], [8], [9]], [1, 2, 3], [[1], [2], [3]]).scheduled, 4)
    inputs.pad(4)
    f = inputs.fields(4)
    assert (f.input_ids.tolist(), f.positions.tolist()) == ([0] * 4, [0] * 4)
    assert (f.slot_mapping.tolist(), f.seq_lens.tolist()) == ([-1] * 4, [0] * 4)


@pytest.mark.parametrize(
    ("n", "padded", "positions", "tables", "error"),
    [
        (3, 2, [0] * 3, [[1]] * 3, "padded"),
        (3, 16, [0] * 3, [[1]] * 3, "padded"),
        (1, 1, [0], [[1, 2, 3, 4, 5]], "5 blocks exceed"),
        (2, 2, [3, 4], [[1], [2]], "no KV block"),
    ],
)
def test_static_inputs_load_rejects_what_no_graph_holds(
    n: int, padded: int, positions: list[int], tables: list[list[int]], error: str
) -> None:
    inputs = StaticDecodeInputs(max_batch=8, max_blocks_per_seq=4, block_size=4, device=CPU)
    step = decode_at([[1]] * n, positions, tables)
    with pytest.raises(ValueError, match=error):
        inputs.load(step.scheduled, padded)


def decode_at(
    tokens: list[list[int]], positions: list[int], tables: list[list[int]]
) -> SchedulerOutput:
    """A decode step whose i-th request computes its last token ``tokens[i][-1]`` at
    ``positions[i]`` (earlier tokens are filler), holding blocks ``tables[i]``."""
    scheduled = []
    for i, (ids, pos, table) in enumerate(zip(tokens, positions, tables, strict=True)):
        req = Request(f"d{i}", [0] * pos + ids[-1:], GREEDY, 8, frozenset())
        req.num_computed_tokens = pos
        req.block_ids = list(table)
        scheduled.append(ScheduledRequest(req, 1))
    return SchedulerOutput(scheduled=scheduled)


# --- CPU: config and runner -----------------------------------------------------------------


def config(model_dir: Path, backend: str = "auto", **engine: object) -> EngineConfig:
    return EngineConfig(
        model_path=str(model_dir),
        dtype="float32",
        attention_backend=backend,
        cache=CacheConfig(block_size=4, num_kv_blocks=1024),
        scheduler=SchedulerConfig(max_num_seqs=64, max_model_len=96),
        **engine,
    )


def test_enforce_eager_defaults_off_and_the_cli_flag_sets_it(stories_dir: Path) -> None:
    assert EngineConfig(model_path=str(stories_dir)).enforce_eager is False
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    for argv, expected in (([], False), (["--enforce-eager"], True)):
        assert engine_config(parser.parse_args(argv), stories_dir).enforce_eager is expected


@pytest.mark.usefixtures("one_torch_thread")
def test_a_cpu_engine_never_captures(stories_dir: Path) -> None:
    engine = Engine(config(stories_dir), CPU)
    assert engine.runner.cuda_graphs is None
    engine.add_request(RequestSpec("a", [1, 403, 407], GREEDY, 2))
    while engine.has_work:
        engine.step()


PROMPTS = [[1, 403, 407, 261, 378], [1, 291], [1, 291, 376, 280, 294, 286, 399, 296, 418]]
TABLES = [[0, 5], [2], [7, 3, 9]]  # block 0 holds live KV: padding must neither read nor write


def decode_step(prompts: list[list[int]], blocks: list[list[int]]) -> SchedulerOutput:
    """A decode step of requests whose prompts are all computed but the last token."""
    scheduled = []
    for i, (ids, table) in enumerate(zip(prompts, blocks, strict=True)):
        req = Request(f"r{i}", list(ids), GREEDY, 8, frozenset())
        req.num_computed_tokens = len(ids) - 1
        req.block_ids = list(table)
        scheduled.append(ScheduledRequest(req, 1))
    return SchedulerOutput(scheduled=scheduled)


def prefill_before(decode: SchedulerOutput) -> SchedulerOutput:
    """The step that computes every prompt token before ``decode``'s (it samples nothing)."""
    scheduled = []
    for s in decode.scheduled:
        s.request.num_computed_tokens = 0
        scheduled.append(ScheduledRequest(s.request, s.request.num_prompt_tokens - 1))
    return SchedulerOutput(scheduled=scheduled)


def triton_runner(model_dir: Path) -> ModelRunner:
    runner = ModelRunner(config(model_dir, "triton"), CPU)
    runner.allocate_kv_cache(16)
    return runner


@pytest.mark.usefixtures("one_torch_thread")
def test_the_padded_static_forward_equals_eager_and_writes_only_real_slots(
    stories_dir: Path,
) -> None:
    """What a graph records, run eagerly (Triton interpreter): 3 requests padded to 4. Block 0
    holds live KV, so a padding row that wrote its slot or read its table would show."""
    pytest.importorskip("triton")
    runner = triton_runner(stories_dir)
    torch.manual_seed(0)
    runner.kv_cache.normal_()
    step = decode_step(PROMPTS, TABLES)
    host = runner.gather(step)
    with torch.inference_mode():
        expected = runner.forward(host).clone()
        expected_logits = runner.model.compute_logits(expected)
    after_eager = runner.kv_cache.clone()
    graphs = CudaGraphRunner(runner.model, runner.kv_cache, [1, 2, 4], max_blocks_per_seq=24)
    assert graphs.num_splits(4) == 1  # 96 tokens of context give one split
    assert graphs.size_for(step.scheduled) == 4
    assert graphs.size_for(decode_step([[1, 2]] * 5, [[1]] * 5).scheduled) is None  # > 4
    assert graphs.size_for([ScheduledRequest(s.request, 2) for s in step.scheduled]) is None
    assert graphs.size_for([]) is None
    graphs.inputs.load(step.scheduled, 4)
    with torch.inference_mode():
        out = graphs.forward_static(4)
    torch.testing.assert_close(out.hidden[:3], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.logits[:3], expected_logits, atol=1e-5, rtol=1e-5)
    assert out.greedy.tolist()[:3] == expected_logits.argmax(-1).tolist()
    assert out.hidden[3].isfinite().all()  # the padding row attends to nothing, without NaN
    slots = torch.tensor(host.slot_mapping)
    untouched = torch.ones(16 * 4, dtype=torch.bool)
    untouched[slots] = False
    now, before = by_slot(runner.kv_cache), by_slot(after_eager)
    assert torch.equal(now[untouched], before[untouched])
    torch.testing.assert_close(now[slots], before[slots], atol=1e-5, rtol=1e-5)


class ReplayEagerly:
    """Stands in for a captured ``torch.cuda.CUDAGraph`` on CPU: ``replay`` runs the forward the
    graph would have recorded into the graph's output tensor."""

    def __init__(self, graphs: CudaGraphRunner, batch: int) -> None:
        self.graphs, self.batch = graphs, batch

    def replay(self) -> None:
        out, now = self.graphs.outputs[self.batch], self.graphs.forward_static(self.batch)
        for dst, src in (
            (out.hidden, now.hidden),
            (out.logits, now.logits),
            (out.greedy, now.greedy),
        ):
            dst.copy_(src)


def stand_in_graphs(runner: ModelRunner, sizes: list[int]) -> CudaGraphRunner:
    """A CudaGraphRunner over the runner's model whose graphs replay eagerly (CPU)."""
    graphs = CudaGraphRunner(runner.model, runner.kv_cache, sizes, max_blocks_per_seq=24)
    cfg = runner.model_config
    for b in graphs.sizes:
        graphs.graphs[b] = ReplayEagerly(graphs, b)
        graphs.outputs[b] = DecodeOutputs(
            torch.empty(b, cfg.hidden_size),
            torch.empty(b, cfg.vocab_size),
            torch.empty(b, dtype=torch.int64),
        )
    runner.cuda_graphs = graphs
    return graphs


@pytest.mark.usefixtures("one_torch_thread")
def test_execute_replays_decode_only_steps_and_runs_the_rest_eagerly(stories_dir: Path) -> None:
    pytest.importorskip("triton")
    runner = triton_runner(stories_dir)
    graphs = stand_in_graphs(runner, [1, 2, 4])
    decode = decode_step(PROMPTS, TABLES)
    assert runner.execute(prefill_before(decode)) == ({}, {})
    assert graphs.num_replays == 0
    for s, ids in zip(decode.scheduled, PROMPTS, strict=True):
        s.request.num_computed_tokens = len(ids) - 1
    sampled = spy_on_sampler(runner)
    replayed, _ = runner.execute(decode)
    assert graphs.num_replays == 1
    assert sampled == []  # all greedy: the captured argmax, no sampler
    with runner.eager():
        eager, _ = runner.execute(decode)
    assert graphs.num_replays == 1
    assert replayed == eager and len(replayed) == 3
    runner.allocate_kv_cache(16)
    assert runner.cuda_graphs is None  # graphs recorded the old cache's address


def spy_on_sampler(runner: ModelRunner) -> list[int]:
    """Records the batch size of every ``runner.sampler.sample`` call in the returned list."""
    calls: list[int] = []
    sample = runner.sampler.sample

    def spy(logits: torch.Tensor, requests: list[Request]) -> tuple:
        calls.append(len(requests))
        return sample(logits, requests)

    runner.sampler.sample = spy
    return calls


@pytest.mark.usefixtures("one_torch_thread")
def test_replayed_steps_that_need_the_sampler_run_it_on_the_captured_logits(
    stories_dir: Path,
) -> None:
    """Rows with logprobs, an active ``min_tokens`` mask or a seeded temperature go through the
    sampler on the graph's logits and get what an eager step gives them."""
    pytest.importorskip("triton")
    runner = triton_runner(stories_dir)
    graphs = stand_in_graphs(runner, [1, 2, 4])
    decode = decode_step(PROMPTS, TABLES)
    runner.execute(prefill_before(decode))
    for s, ids in zip(decode.scheduled, PROMPTS, strict=True):
        s.request.num_computed_tokens = len(ids) - 1
    with runner.eager():
        greedy, _ = runner.execute(decode)
    r0, r1, r2 = (s.request for s in decode.scheduled)
    r0.sampling = SamplingParams(temperature=0.0, logprobs=3)
    r1.sampling = SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=(greedy["r1"],))
    r2.sampling = SamplingParams(temperature=0.8, top_p=0.9, seed=11)
    sampled = spy_on_sampler(runner)
    replayed = runner.execute(decode)
    assert graphs.num_replays == 1 and sampled == [3]
    runner.sampler.forget("r2")
    with runner.eager():
        eager = runner.execute(decode)
    assert replayed[0] == eager[0]
    assert replayed[0]["r0"] == greedy["r0"] and replayed[0]["r1"] != greedy["r1"]
    chosen, top_ids, top_lp = replayed[1]["r0"]
    assert top_ids == eager[1]["r0"][1] and len(top_ids) == 3
    assert chosen == pytest.approx(eager[1]["r0"][0], abs=1e-4)
    assert top_lp == pytest.approx(eager[1]["r0"][2], abs=1e-4)


def by_slot(kv_cache: torch.Tensor) -> torch.Tensor:
    """[num_blocks * block_size, ...]: the cache's rows indexed by slot."""
    num_blocks, block_size = kv_cache.shape[0], kv_cache.shape[3]
    return kv_cache.permute(0, 3, 1, 2, 4, 5).reshape(num_blocks * block_size, -1)


# --- GPU: real graphs -----------------------------------------------------------------------


def graph_and_eager_outputs(
    engine: Engine, prompts: list[list[int]], max_tokens: int
) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """Greedy outputs of the same prompts with graphs, then eagerly, on one engine; asserts
    that the first run replayed graphs and took every replayed step's tokens from the
    captured argmax (no sampler), and that the second did not replay."""
    runs = []
    graphs = engine.runner.cuda_graphs
    assert graphs is not None
    greedy_reads = count_calls(graphs, "read_greedy")
    for eager in (False, True):
        before, reads = graphs.num_replays, len(greedy_reads)
        for i, p in enumerate(prompts):
            engine.add_request(RequestSpec(str(i), p, GREEDY, max_tokens))
        if eager:
            with engine.runner.eager():
                runs.append(run_to_completion(engine))
            assert graphs.num_replays == before and len(greedy_reads) == reads
        else:
            runs.append(run_to_completion(engine))
            assert graphs.num_replays > before
            assert len(greedy_reads) - reads == graphs.num_replays - before
    return runs[0], runs[1]


def count_calls(obj: object, method: str) -> list[int]:
    """Wraps ``obj.method``; the returned list grows by one entry per call."""
    calls: list[int] = []
    wrapped = getattr(obj, method)

    def spy(*args: object) -> object:
        calls.append(1)
        return wrapped(*args)

    setattr(obj, method, spy)
    return calls


def random_prompts(n: int, vocab: int, max_len: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (n,), generator=gen).tolist()
    return [torch.randint(3, vocab, (k,), generator=gen).tolist() for k in lengths]


@gpu
def test_graphs_reproduce_the_golden_greedy_outputs(stories_dir: Path, golden_cases) -> None:
    engine = Engine(config(stories_dir), CUDA)
    prompts = [c["input_ids"] for c in golden_cases]  # 6 requests: padded to 8
    with_graphs, eager = graph_and_eager_outputs(engine, prompts, 64)
    expected = {str(i): c["greedy_new_token_ids"] for i, c in enumerate(golden_cases)}
    assert with_graphs == eager == expected


@gpu
@pytest.mark.parametrize("batch", [3, 37])
def test_padded_batches_equal_eager_on_stories(stories_dir: Path, batch: int) -> None:
    engine = Engine(config(stories_dir), CUDA)
    prompts = random_prompts(batch, 512, 40, seed=batch)
    with_graphs, eager = graph_and_eager_outputs(engine, prompts, 16)
    assert with_graphs == eager
    assert len(with_graphs) == batch


def dummy_model_dir(tmp_path: Path) -> Path:
    return write_dummy_gqa_config(tmp_path, num_layers=2)


def dummy_engine(model_dir: Path, seed: int = 0) -> Engine:
    """Dummy weights redrawn as N(0, 0.02) in place (after capture: graphs read the same
    memory), so greedy picks are not near-ties as with the loader's tiny uniform noise."""
    cfg = EngineConfig(
        model_path=str(model_dir),
        load_format="dummy",
        dtype="float32",
        cache=CacheConfig(block_size=16, num_kv_blocks=2048),
        scheduler=SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=4096),
    )
    engine = Engine(cfg, CUDA)
    gen = torch.Generator(device=CUDA).manual_seed(seed)
    for name, p in engine.runner.model.named_parameters():
        if not name.endswith("norm.weight"):
            p.data.normal_(0.0, 0.02, generator=gen)
    return engine


@gpu
@pytest.mark.parametrize("batch", [3, 37])
def test_padded_batches_equal_eager_on_a_dummy_gqa_model(tmp_path: Path, batch: int) -> None:
    engine = dummy_engine(dummy_model_dir(tmp_path))
    graphs = engine.runner.cuda_graphs
    assert graphs is not None and graphs.num_splits(4) > 1  # the split-K decode path
    prompts = random_prompts(batch, 1000, 300, seed=batch)
    with_graphs, eager = graph_and_eager_outputs(engine, prompts, 12)
    assert with_graphs == eager


def mixed_sampling(i: int) -> SamplingParams:
    """Request ``i``'s sampling in the mixed test: greedy, greedy with logprobs, greedy with
    a min_tokens mask, or a seeded temperature, in turn."""
    return [
        GREEDY,
        SamplingParams(temperature=0.0, logprobs=2),
        SamplingParams(temperature=0.0, min_tokens=6, stop_token_ids=(5, 6, 7)),
        SamplingParams(temperature=0.8, top_p=0.9, seed=100 + i),
    ][i % 4]


@gpu
@pytest.mark.parametrize("batch", [3, 37])
def test_steps_needing_the_sampler_equal_eager_on_stories(stories_dir: Path, batch: int) -> None:
    """Batches mixing plain greedy rows with rows the sampler must handle (logprobs, min_tokens,
    seeded temperature) sample on the captured logits and match eager, logprobs included."""
    engine = Engine(config(stories_dir), CUDA)
    graphs = engine.runner.cuda_graphs
    prompts = random_prompts(batch, 512, 40, seed=batch + 1)
    runs = []
    for eager in (False, True):
        before = graphs.num_replays
        for i, p in enumerate(prompts):
            engine.add_request(RequestSpec(str(i), p, mixed_sampling(i), 12))
        with engine.runner.eager() if eager else contextlib.nullcontext():
            runs.append(generate_with_logprobs(engine))
        assert (graphs.num_replays > before) != eager
    (tokens, logprobs), (eager_tokens, eager_logprobs) = runs
    assert tokens == eager_tokens
    assert logprobs.keys() == eager_logprobs.keys() and len(logprobs) == len(range(1, batch, 4))
    for rid, steps in logprobs.items():
        for (chosen, ids, values), (e_chosen, e_ids, e_values) in zip(
            steps, eager_logprobs[rid], strict=True
        ):
            assert ids == e_ids
            assert [chosen, *values] == pytest.approx([e_chosen, *e_values], abs=1e-4)


def generate_with_logprobs(engine: Engine) -> tuple[dict[str, list[int]], dict[str, list]]:
    tokens: dict[str, list[int]] = {}
    logprobs: dict[str, list] = {}
    while engine.has_work:
        for o in engine.step():
            tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
            if o.logprobs:  # one (chosen, top ids, top) per new token
                logprobs.setdefault(o.request_id, []).extend(o.logprobs)
    assert engine.pool.num_used == 0
    return tokens, logprobs


@gpu
def test_a_dead_graph_collected_during_a_capture_does_not_invalidate_it() -> None:
    """A graph in a reference cycle is freed when the cyclic collector next runs, and its
    destructor is not permitted while a stream captures. Collections made as frequent as
    they go inside a capture must leave it valid, replaying correctly."""
    pool, stream = torch.cuda.graph_pool_handle(), torch.cuda.Stream(CUDA)
    x = torch.arange(8.0, device=CUDA)
    thresholds = gc.get_threshold()
    calls = []

    def forward() -> torch.Tensor:
        calls.append(1)
        if len(calls) == 2:  # the capture (the first call is record's warm-up)
            gc.set_threshold(1, 1, 1)
            junk = [[i] for i in range(1000)]  # each new list may start a collection
            assert junk
        return x + 1

    try:
        for _ in range(4):  # dead graphs, each reachable only from its own cycle
            dead, _ = record(lambda: x * 2, pool, stream)
            cycle: list = [dead]
            cycle.append(cycle)
        gc.set_threshold(10**6, 10**3, 10**3)  # none collected before the capture
        del dead, cycle
        graph, out = record(forward, pool, stream)
    finally:
        gc.set_threshold(*thresholds)
    assert gc.isenabled()
    x.fill_(5.0)
    graph.replay()
    torch.cuda.synchronize()
    assert out.tolist() == [6.0] * 8


@gpu
def test_one_decode_step_replayed_equals_eager_hidden_states(tmp_path: Path) -> None:
    engine = dummy_engine(dummy_model_dir(tmp_path), seed=1)
    for i, p in enumerate(random_prompts(37, 1000, 300, seed=7)):
        engine.add_request(RequestSpec(str(i), p, GREEDY, 8))
    while engine.scheduler.waiting or any(
        r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running
    ):
        engine.step()
    out = engine.scheduler.schedule()
    assert [s.num_new_tokens for s in out.scheduled] == [1] * 37
    runner = engine.runner
    host = runner.gather(out)
    with torch.inference_mode():
        replayed = runner.cuda_graphs.run(out.scheduled, 64)
        eager = runner.forward(host)
        eager_logits = runner.model.compute_logits(eager)
        torch.testing.assert_close(replayed.hidden, eager, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(replayed.logits, eager_logits, atol=1e-4, rtol=1e-4)
        assert replayed.greedy.tolist() == eager_logits.argmax(-1).tolist()


@gpu
def test_decode_after_aborts_and_new_requests_stays_correct(
    stories_dir: Path, golden_cases: list[dict]
) -> None:
    """Aborting frees blocks that new requests then reuse, and the batch shrinks and grows
    across captured sizes; every surviving request still gets its golden greedy output."""
    engine = Engine(config(stories_dir), CUDA)

    def add(i: int) -> None:
        engine.add_request(RequestSpec(str(i), golden_cases[i]["input_ids"], GREEDY, 64))

    for i in (0, 1, 2):
        add(i)
    tokens: dict[str, list[int]] = {}
    for step in range(40):
        for o in engine.step():
            tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
        if step == 10:
            engine.abort("1")
            for i in (3, 4, 5):
                add(i)
    for rid, new in run_to_completion(engine).items():
        tokens[rid].extend(new)
    del tokens["1"]
    expected = {str(i): golden_cases[i]["greedy_new_token_ids"] for i in (0, 2, 3, 4, 5)}
    assert tokens == expected
    assert engine.runner.cuda_graphs.num_replays > 30


@gpu
def test_enforce_eager_captures_nothing_on_a_gpu(stories_dir: Path, golden_cases) -> None:
    engine = Engine(config(stories_dir, enforce_eager=True), CUDA)
    assert engine.runner.cuda_graphs is None
    engine.add_request(RequestSpec("0", golden_cases[2]["input_ids"], GREEDY, 64))
    assert run_to_completion(engine) == {"0": golden_cases[2]["greedy_new_token_ids"]}


class CountedCapture:
    """Stands in for CudaGraphRunner where CUDA cannot capture: counts captures."""

    made: list[CountedCapture] = []

    def __init__(self, model, kv_cache, sizes, width, piecewise=None) -> None:
        self.kv_cache, self.piecewise = kv_cache, piecewise
        CountedCapture.made.append(self)

    def capture(self) -> None:
        pass


def test_a_restore_keeps_parked_graphs_only_if_nothing_they_read_moved(
    stories_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A drop parks the graphs; a restore keeps them when every weight and the KV cache are
    where they were captured (VMM), and captures anew when any of them moved (torch memory)."""
    import workers.model_runner as mr

    monkeypatch.setattr(mr, "graph_blocker", lambda *args: None)
    monkeypatch.setattr(mr, "CudaGraphRunner", CountedCapture)
    CountedCapture.made.clear()
    runner = ModelRunner(config(stories_dir, "torch"), CPU)
    runner.allocate_kv_cache(16)
    runner.capture_cuda_graphs()
    first = runner.cuda_graphs
    assert CountedCapture.made == [first]
    runner.park_cuda_graphs()
    assert runner.cuda_graphs is None  # a pipeline stage never replays them
    runner.capture_cuda_graphs()
    assert runner.cuda_graphs is first and len(CountedCapture.made) == 1
    runner.park_cuda_graphs()
    w = runner.model.layers[1].mlp.down_proj.weight
    w.data = w.data.clone()  # the layer came back at another address
    runner.capture_cuda_graphs()
    assert runner.cuda_graphs is not first and len(CountedCapture.made) == 2
    runner.park_cuda_graphs()
    runner.kv_cache = runner.kv_cache.clone()  # so did the KV cache
    runner.capture_cuda_graphs()
    assert len(CountedCapture.made) == 3


def test_graph_key_sees_every_tensor_a_graph_reads(stories_dir: Path) -> None:
    runner = ModelRunner(config(stories_dir, "torch"), CPU)
    runner.allocate_kv_cache(16)
    key = graph_key(runner.model, runner.kv_cache)
    assert graph_key(runner.model, runner.kv_cache) == key
    assert graph_key(runner.model, runner.kv_cache[:8]) != key  # fewer blocks: another shape
    runner.model.cos_sin_cache = runner.model.cos_sin_cache.clone()
    assert graph_key(runner.model, runner.kv_cache) != key
