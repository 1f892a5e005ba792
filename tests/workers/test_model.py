"""The Llama model, runner and engine on stories260K (a real 5-layer GQA Llama) on CPU."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from attention.backends import TorchBackend
from tests.workers.engine_helpers import run_to_completion
from workers.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from workers.engine import Engine, RequestSpec
from workers.forward_context import ForwardContext, set_forward_context
from workers.model_loader import build_model
from workers.model_runner import ModelRunner
from workers.request import PLACEHOLDER_TOKEN, Request, SamplingParams
from workers.sampler import SampledTokens
from workers.scheduler import ScheduledRequest, SchedulerOutput

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = torch.device("cpu")
BLOCK_SIZE = 4
GREEDY = SamplingParams(temperature=0.0, max_tokens=64)
PROMPTS = [
    [1],
    [1, 403, 407, 261, 378],
    [1, 291, 376, 280, 294, 286, 399, 296, 418, 329, 429, 412, 425, 372, 13, 300, 301],
]


def engine_config(
    model_dir: Path, blocks: int = 256, budget: int = 2048, max_model_len: int = 96
) -> EngineConfig:
    return EngineConfig(
        model_path=str(model_dir),
        dtype="float32",
        attention_backend="torch",
        cache=CacheConfig(block_size=BLOCK_SIZE, num_kv_blocks=blocks),
        scheduler=SchedulerConfig(max_num_batched_tokens=budget, max_model_len=max_model_len),
    )


def make_runner(
    model_dir: Path, layer_range: tuple[int, int] | None = None, blocks: int = 64
) -> ModelRunner:
    runner = ModelRunner(engine_config(model_dir), CPU, layer_range)
    runner.allocate_kv_cache(blocks)
    return runner


def prefill_step(prompts: list[list[int]], chunk: tuple[int, int] | None = None) -> SchedulerOutput:
    """One step that computes tokens ``[lo, hi)`` (all by default) of every prompt, each
    prompt in its own run of blocks."""
    scheduled, next_block = [], 0
    for i, ids in enumerate(prompts):
        lo, hi = chunk or (0, len(ids))
        req = Request(f"p{i}", list(ids), GREEDY, 64, frozenset())
        req.num_computed_tokens = lo
        num_blocks = -(-len(ids) // BLOCK_SIZE)
        req.block_ids = list(range(next_block, next_block + num_blocks))
        next_block += num_blocks
        scheduled.append(ScheduledRequest(req, hi - lo))
    return SchedulerOutput(scheduled=scheduled)


def all_position_logits(runner: ModelRunner, out: SchedulerOutput) -> torch.Tensor:
    """[num_tokens, vocab]: the logits of every scheduled token, not only the sampled ones."""
    inputs = runner.prepare(out)
    with torch.inference_mode(), set_forward_context(ForwardContext(inputs.meta, runner.kv_cache)):
        hidden, _ = runner.model(inputs.positions, input_ids=inputs.input_ids)
        return runner.model.compute_logits(hidden)


def add_golden(engine: Engine, cases: list[dict], indices: range) -> None:
    for i in indices:
        engine.add_request(RequestSpec(str(i), cases[i]["input_ids"], GREEDY, 64))


@pytest.fixture(scope="module")
def hf_model(stories_dir: Path):
    transformers = pytest.importorskip("transformers")
    model = transformers.LlamaForCausalLM.from_pretrained(stories_dir, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def runner(stories_dir: Path) -> ModelRunner:
    return make_runner(stories_dir)


def test_logits_of_every_position_match_transformers(runner: ModelRunner, hf_model) -> None:
    logits = all_position_logits(runner, prefill_step(PROMPTS))
    with torch.inference_mode():
        expected = torch.cat([hf_model(torch.tensor([p])).logits[0] for p in PROMPTS])
    assert logits.shape == expected.shape == (sum(map(len, PROMPTS)), 512)
    assert (logits - expected).abs().max().item() <= 1e-4


def test_chunked_prefill_logits_match_one_pass(runner: ModelRunner) -> None:
    prompt = PROMPTS[2]
    whole = all_position_logits(runner, prefill_step([prompt]))
    runner.kv_cache.zero_()
    first = all_position_logits(runner, prefill_step([prompt], (0, 6)))
    rest = all_position_logits(runner, prefill_step([prompt], (6, len(prompt))))
    assert (torch.cat([first, rest]) - whole).abs().max().item() <= 1e-4


def test_last_prompt_logits_match_the_golden_top5(runner: ModelRunner, golden_cases) -> None:
    prompts = [c["input_ids"] for c in golden_cases]
    logits = all_position_logits(runner, prefill_step(prompts))
    ends = torch.tensor([len(p) for p in prompts]).cumsum(0) - 1
    for case, row in zip(golden_cases, logits[ends], strict=True):
        values, ids = row.topk(5)
        assert ids.tolist() == case["last_logits_top5_ids"]
        torch.testing.assert_close(
            values, torch.tensor(case["last_logits_top5_values"]), atol=1e-4, rtol=0
        )


def test_engine_reproduces_golden_greedy_one_at_a_time(stories_dir: Path, golden_cases) -> None:
    engine = Engine(engine_config(stories_dir), CPU)
    for i, case in enumerate(golden_cases):
        add_golden(engine, golden_cases, range(i, i + 1))
        assert run_to_completion(engine) == {str(i): case["greedy_new_token_ids"]}


def test_engine_reproduces_golden_greedy_concurrently(stories_dir: Path, golden_cases) -> None:
    engine = Engine(engine_config(stories_dir, budget=7), CPU)
    add_golden(engine, golden_cases, range(len(golden_cases)))
    expected = {str(i): c["greedy_new_token_ids"] for i, c in enumerate(golden_cases)}
    assert run_to_completion(engine) == expected
    assert engine.scheduler.num_preemptions == 0


def test_engine_reproduces_golden_greedy_under_preemption(stories_dir: Path, golden_cases) -> None:
    # 24 blocks of 4 tokens (96 = max_model_len) against about 6 x 20 blocks of demand.
    engine = Engine(engine_config(stories_dir, blocks=24, budget=7), CPU)
    add_golden(engine, golden_cases, range(len(golden_cases)))
    expected = {str(i): c["greedy_new_token_ids"] for i, c in enumerate(golden_cases)}
    assert run_to_completion(engine) == expected
    assert engine.scheduler.num_preemptions > 0


def test_seeded_sampling_survives_batching_and_preemption(stories_dir: Path, golden_cases) -> None:
    seeded = SamplingParams(temperature=1.0, seed=5, max_tokens=40)
    prompt = golden_cases[2]["input_ids"]
    alone = Engine(engine_config(stories_dir), CPU)
    alone.add_request(RequestSpec("s", prompt, seeded, 40))
    expected = run_to_completion(alone)["s"]
    assert expected != golden_cases[2]["greedy_new_token_ids"][:40]
    crowded = Engine(engine_config(stories_dir, blocks=24, budget=7), CPU)
    add_golden(crowded, golden_cases, range(2))
    crowded.add_request(RequestSpec("s", prompt, seeded, 40))
    add_golden(crowded, golden_cases, range(3, 6))
    preemptions: dict[str, int] = {}
    assert run_to_completion(crowded, preemptions)["s"] == expected
    assert preemptions["s"] > 0


def test_two_stages_chained_by_hand_equal_the_full_model(
    stories_dir: Path, runner: ModelRunner
) -> None:
    stages = [make_runner(stories_dir, (0, 2)), make_runner(stories_dir, (2, 5))]
    assert [s.layers_per_block for s in stages] == [2, 3]
    assert stages[0].model.lm_head is None and stages[1].model.embed_tokens is None
    runner.kv_cache.zero_()
    for chunk in ((0, 11), (11, 17)):  # a prefill, then a chunk over the cached prefix
        out = prefill_step([PROMPTS[2]], chunk)
        expected = all_position_logits(runner, out)
        inputs = runner.prepare(out)
        with torch.inference_mode():
            with set_forward_context(ForwardContext(inputs.meta, stages[0].kv_cache)):
                hidden, residual = stages[0].model(inputs.positions, input_ids=inputs.input_ids)
            with set_forward_context(ForwardContext(inputs.meta, stages[1].kv_cache)):
                hidden, _ = stages[1].model(inputs.positions, hidden=hidden, residual=residual)
            logits = stages[1].model.compute_logits(hidden)
        assert torch.equal(logits, expected)


def checkpoint_without(src: Path, dst: Path, name: str) -> Path:
    shutil.copy(src / "config.json", dst / "config.json")
    tensors = load_file(src / "model.safetensors")
    del tensors[name]
    save_file(tensors, dst / "model.safetensors")
    return dst


@pytest.mark.parametrize(
    ("missing", "reported"),
    [
        ("model.layers.3.mlp.down_proj.weight", "layers.3.mlp.down_proj.weight"),
        ("model.norm.weight", "norm.weight"),
        ("model.layers.0.self_attn.k_proj.weight", "layers.0.self_attn.qkv_proj.weight"),
        ("model.layers.1.mlp.up_proj.weight", "layers.1.mlp.gate_up_proj.weight"),
    ],
)
def test_missing_tensor_raises_naming_it(
    stories_dir: Path, tmp_path: Path, missing: str, reported: str
) -> None:
    model_dir = checkpoint_without(stories_dir, tmp_path, missing)
    cfg = ModelConfig.from_dir(model_dir)
    with pytest.raises(ValueError, match=rf"lacks weights for: \['{reported}'\]"):
        build_model(cfg, model_dir, TorchBackend(), CPU, torch.float32)


def test_a_stage_needs_only_its_own_layers(stories_dir: Path, tmp_path: Path) -> None:
    model_dir = checkpoint_without(stories_dir, tmp_path, "model.layers.3.mlp.down_proj.weight")
    cfg = ModelConfig.from_dir(model_dir)
    stage = build_model(cfg, model_dir, TorchBackend(), CPU, torch.float32, layer_range=(0, 2))
    assert (stage.start, stage.end, len(stage.layers)) == (0, 2, 2)


class _OverlappingRunner:
    """Stands in for a pipeline leader's runner (workers/pipeline.py, ``PipelineRunner``):
    keeps ``depth`` micro-batches in flight, each run at launch and its tokens handed out at
    collect, and records the order of launches and collects with their request ids."""

    def __init__(self, runner: ModelRunner, depth: int = 2) -> None:
        self.runner, self.depth = runner, depth
        self.events: list[tuple[str, set[str]]] = []
        self._results: dict[int, tuple] = {}
        self.fed = 0

    def __getattr__(self, name: str):
        if name == "runner":
            raise AttributeError(name)
        return getattr(self.runner, name)

    def overlap_depth(self) -> int:
        return self.depth

    def launch(self, out: SchedulerOutput, feed: SampledTokens | None = None) -> None:
        # The leader feeds a placeholder its token on the device; this runner computes at
        # launch, on the host, so it puts the token in for the run and the placeholder back.
        waiting = [s.request for s in out.scheduled if s.request.awaits_token]
        fed = feed.by_request()[0] if waiting else {}
        for r in waiting:
            r.output_token_ids[-1] = fed[r.request_id]
        self._results[id(out)] = self.runner.execute(out)
        for r in waiting:
            r.output_token_ids[-1] = PLACEHOLDER_TOKEN
        self.events.append(("launch", {s.request.request_id for s in out.scheduled}))
        self.fed += len(waiting)

    def collect_async(self, out: SchedulerOutput) -> SampledTokens:
        self.events.append(("collect", {s.request.request_id for s in out.scheduled}))
        tokens = self._results.pop(id(out))[0]
        requests = [s.request for s in out.scheduled if s.samples]
        return SampledTokens(torch.tensor([tokens[r.request_id] for r in requests]), requests)


def test_overlapped_steps_launch_the_collected_requests_next_token_at_once(
    stories_dir: Path, golden_cases
) -> None:
    # Two micro-batches in flight: each step samples the oldest, then launches the next with
    # the requests just sampled (their tokens fed from the device, before the host reads
    # them), so no host work sits between a sample and the launch of the next token.
    engine = Engine(engine_config(stories_dir, budget=7), CPU)
    engine.runner = fake = _OverlappingRunner(engine.runner)
    add_golden(engine, golden_cases, range(len(golden_cases)))
    # Prompts longer than what is left of the 7-token budget take two chunks: the second
    # launches while the first is in flight (Scheduler docstring), not a micro-batch later.
    tokens: dict[str, list[int]] = {}
    relaunched, chained, in_flight = 0, set(), []
    while engine.has_work:
        before = len(fake.events)
        for o in engine.step():
            tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
        step = fake.events[before:]
        assert len(step) <= 2 and len(fake._results) <= 2
        if [kind for kind, _ in step] == ["collect", "launch"]:
            collected, launched = step[0][1], step[1][1]
            assert collected & launched, "the collected requests wait one more micro-batch"
            relaunched += 1
        for kind, ids in step:
            if kind == "collect":
                in_flight.pop(0)
            else:
                chained |= ids & set().union(*in_flight)
                in_flight.append(ids)
    assert tokens == {str(i): c["greedy_new_token_ids"] for i, c in enumerate(golden_cases)}
    assert relaunched > 10 and fake.fed > 10
    assert chained, "no prompt's next chunk launched while its last one flew"
    engine.pool.check_integrity()
    assert engine.pool.num_used == 0


def test_a_request_stopping_on_a_token_in_flight_gets_nothing_from_its_next_micro_batch(
    stories_dir: Path, golden_cases
) -> None:
    # With the tokens fed on the device, the micro-batch after a request's last token is
    # launched before that token is read: one that stops on it (a stop token id) has one more
    # token computed there, which must reach no output, and one that stops by length is not
    # scheduled again at all. Blocks end free either way.
    engine = Engine(engine_config(stories_dir, budget=7), CPU)
    engine.runner = fake = _OverlappingRunner(engine.runner)
    golden = {str(i): c["greedy_new_token_ids"] for i, c in enumerate(golden_cases)}
    stop_at = golden["0"][10]
    cut = golden["0"].index(stop_at) + 1
    stop = SamplingParams(temperature=0.0, max_tokens=64, stop_token_ids=(stop_at,))
    engine.add_request(RequestSpec("0", golden_cases[0]["input_ids"], stop, 64))
    engine.add_request(RequestSpec("1", golden_cases[1]["input_ids"], GREEDY, 5))
    add_golden(engine, golden_cases, range(2, len(golden_cases)))
    tokens: dict[str, list[int]] = {}
    reasons: dict[str, str] = {}
    launched: dict[str, int] = {}
    while engine.has_work:
        before = len(fake.events)
        for o in engine.step():
            tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
            if o.finish_reason is not None:
                reasons[o.request_id] = o.finish_reason.value
        for kind, ids in fake.events[before:]:
            for rid in ids if kind == "launch" else ():
                launched[rid] = launched.get(rid, 0) + 1
        engine.pool.check_integrity()
    assert tokens["0"] == golden["0"][:cut] and reasons["0"] == "stop"
    assert tokens["1"] == golden["1"][:5] and reasons["1"] == "length"
    assert all(tokens[i] == golden[i] for i in map(str, range(2, len(golden_cases))))
    assert len(golden_cases[0]["input_ids"]) == 1
    assert launched["0"] == 1 + (cut - 1) + 1  # its prompt, its decodes, one past its stop
    assert launched["1"] == 1 + 4  # its prompt, then one launch per token it went on with
    assert engine.pool.num_used == 0 and not engine.scheduler.running
