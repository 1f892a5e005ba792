"""``kunserve bench engine``: one engine's decode and prefill, each beside a floor or a baseline
measured in the same run.

- Decode step time beside the HBM floor: the bytes a decode step must read (all weights plus
  every request's KV) over the copy bandwidth measured in the same run (a device-to-device
  copy, bytes read plus written). With CUDA graphs captured, every point is timed a second
  time with the graphs bypassed (``ModelRunner.eager``) on the same engine and requests,
  and two columns say where a graph step's time goes: ``replay ms``, the GPU time of the
  point's captured graph replayed alone (embedding through the greedy argmax), and ``host gap
  ms``, the mean host time per step from one step's tokens reaching the host to the next
  replay's launch (scheduler update and schedule, input preparation), while the GPU idles.
- Prefill throughput at 8k tokens (1 x 8192 and 8 x 1024) in tokens/s and TFLOP/s, beside
  the bf16 rate of an 8192^3 ``torch.matmul`` measured in the same run.
- Mixed steps (a prefill chunk beside 32 decodes, 64 to 1,024 tokens in all) through the
  piecewise graphs (workers/piecewise_graphs.py) beside the same step run eagerly.
- HF transformers baseline: a ``LlamaForCausalLM`` built from the same ``config.json`` with
  random weights in the engine's dtype, its decode step at batch 1 and 64 with 1k context,
  beside ours. It runs before the engine is built, so both never hold GPU memory at once.
- Optionally (``profile``: batch sizes), last: the decode graph of each such batch at every
  context replayed under ``torch.profiler``, as a per-kernel table (count, µs and share of
  the step), the idle time between kernels inside the graph, the launch gap between replays,
  and each GEMM's bytes/s beside the copy bandwidth (``workers/bench_profile.py``).
"""

from __future__ import annotations

import gc
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from kernels.paged_prefill import causal_pairs
from workers.bench_profile import (
    StepProfile,
    attribute_gemms,
    build_profile,
    format_profile,
    model_projections,
    profile_decode_graph,
)
from workers.config import EngineConfig, ModelConfig, parse_dtype
from workers.cuda_graphs import padded_batch_size
from workers.engine import Engine, RequestSpec
from workers.request import Request, SamplingParams
from workers.scheduler import ScheduledRequest, SchedulerOutput

HF_POINTS = ((1, 1024), (64, 1024))
"""(batch, context) points of the HF transformers baseline."""
PREFILL_SHAPES = ((1, 8192), (8, 1024))
"""(prompts, tokens per prompt) of the prefill points: 8192 tokens each."""
WARMUP_STEPS = 2
MIXED_TOKENS = (64, 128, 256, 512, 1024)
"""Token counts of the mixed-step points (a prefill chunk plus 32 decodes)."""


@dataclass
class DecodeResult:
    batch: int
    context: int
    step_ms: float
    tokens_per_s: float
    floor_ms: float
    mean_running: float  # requests actually decoding per timed step
    preemptions: int  # during the whole point (prefill included)
    eager_step_ms: float | None = None  # the same point with CUDA graphs bypassed
    graph_ms: float | None = None  # GPU time of one replay of the point's decode graph alone
    host_gap_ms: float | None = None
    """Mean host time per timed step between the tokens reaching the host and the next
    replay's launch (update, schedule, input preparation), while the GPU idles."""

    @property
    def vs_floor(self) -> float:
        return self.step_ms / self.floor_ms if self.floor_ms else float("nan")

    @property
    def graph_speedup(self) -> float:
        """Eager step time over graph step time (nan without graphs)."""
        return self.eager_step_ms / self.step_ms if self.eager_step_ms else float("nan")


@dataclass
class PrefillResult:
    num_seqs: int
    prompt_len: int  # tokens per prompt
    seconds: float  # mean wall time from adding the prompts to their first token
    flops: float  # model FLOPs of the prefill (prefill_flops)
    matmul_flops_per_s: float  # bf16 8192^3 matmul rate, same run

    @property
    def tokens_per_s(self) -> float:
        return self.num_seqs * self.prompt_len / self.seconds

    @property
    def tflops_per_s(self) -> float:
        return self.flops / self.seconds / 1e12

    @property
    def vs_matmul(self) -> float:
        """Achieved FLOP/s over the matmul rate (a model-FLOPs utilization)."""
        return self.flops / self.seconds / self.matmul_flops_per_s


@dataclass
class MixedResult:
    """One mixed step (a prefill chunk beside decodes) with and without piecewise graphs."""

    tokens: int  # the step's tokens: the chunk plus one per decode
    decodes: int
    context: int  # tokens of context of each decode (and the chunk's prompt)
    step_ms: float  # through the piecewise graphs (eager where the engine has none)
    eager_ms: float | None = None  # the same step with every graph bypassed

    @property
    def speedup(self) -> float:
        """Eager step time over the piecewise one (nan without graphs)."""
        return self.eager_ms / self.step_ms if self.eager_ms else float("nan")


@dataclass
class ChunkDepthResult:
    """One prefill chunk of ``tokens`` tokens ending at position ``context`` of its prompt
    (no decodes beside it): how its time grows with the context its attention reads."""

    tokens: int
    context: int
    step_ms: float
    flops: float  # chunk_flops
    attention_flops: float  # the causal attention's part of ``flops``

    @property
    def tflops_per_s(self) -> float:
        return self.flops / self.step_ms / 1e9


@dataclass
class HfResult:
    batch: int
    context: int
    hf_step_ms: float
    ours_step_ms: float

    @property
    def speedup(self) -> float:
        """HF step time over ours: how many times faster our decode step is."""
        return self.hf_step_ms / self.ours_step_ms


def copy_bandwidth(device: torch.device, nbytes: int = 2 << 30) -> float:
    """Bytes/s of a large device-to-device copy, counting bytes read and written."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    _sync(device)
    t0 = time.perf_counter()
    iters = 10
    for _ in range(iters):
        dst.copy_(src)
    _sync(device)
    return 2 * src.numel() * src.element_size() * iters / (time.perf_counter() - t0)


def matmul_flops_per_s(device: torch.device, n: int = 8192, iters: int = 10) -> float:
    """FLOP/s of an ``n x n x n`` bf16 ``torch.matmul`` on random data (2 n^3 per product)."""
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    for _ in range(3):
        torch.matmul(a, b)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        torch.matmul(a, b)
    _sync(device)
    return 2 * n**3 * iters / (time.perf_counter() - t0)


def prefill_flops(cfg: ModelConfig, prompt_lens: list[int]) -> float:
    """FLOPs of prefilling ``prompt_lens`` (tokens each) and sampling one token per prompt:
    each prompt is one chunk from position 0 (:func:`chunk_flops`)."""
    return sum(chunk_flops(cfg, n, 0)[0] for n in prompt_lens)


def chunk_flops(cfg: ModelConfig, tokens: int, start: int) -> tuple[float, float]:
    """(all, attention) FLOPs of one prefill chunk of ``tokens`` tokens from position
    ``start`` that samples one token.

    ``2 * params * tokens`` for the decoder layers' matmuls (q/k/v, o, gate/up, down), plus
    the LM head once, plus causal attention: ``QK^T`` and ``PV`` cost ``2 * d`` each per
    (query, key) pair, ``causal_pairs(tokens, start)`` pairs per head and layer.
    """
    h = cfg.hidden_size
    dense = 2 * cfg.num_layers * cfg.layer_matmul_params * tokens + 2 * h * cfg.vocab_size
    attn = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * causal_pairs(tokens, start)
    return float(dense + attn), float(attn)


def _random_prompt(vocab: int, length: int, gen: torch.Generator) -> list[int]:
    return torch.randint(0, vocab, (length,), generator=gen).tolist()


def bench_prefill(engine: Engine, num_seqs: int, prompt_len: int, reps: int = 3) -> float:
    """Mean seconds from adding ``num_seqs`` random prompts of ``prompt_len`` tokens (one
    output token each) until all finish, after one untimed warm-up run."""
    vocab = engine.runner.model_config.vocab_size
    gen = torch.Generator().manual_seed(num_seqs * 31 + prompt_len)
    sampling = SamplingParams(temperature=0.0, ignore_eos=True)
    times = []
    for rep in range(reps + 1):
        prompts = [_random_prompt(vocab, prompt_len, gen) for _ in range(num_seqs)]
        _sync(engine.runner.device)
        t0 = time.perf_counter()
        for i, prompt in enumerate(prompts):
            engine.add_request(RequestSpec(f"prefill-{rep}-{i}", prompt, sampling, max_tokens=1))
        while engine.has_work:
            engine.step()
        _sync(engine.runner.device)
        times.append(time.perf_counter() - t0)
    return sum(times[1:]) / reps


def _timed_steps(engine: Engine, steps: int) -> tuple[float, int]:
    """Runs warm-up then ``steps`` timed steps; returns (seconds, request-steps decoded)."""
    for _ in range(WARMUP_STEPS):
        engine.step()
    _sync(engine.runner.device)
    t0 = time.perf_counter()
    running = 0
    for _ in range(steps):
        running += len(engine.scheduler.running)
        engine.step()
    _sync(engine.runner.device)
    return time.perf_counter() - t0, running


def bench_decode(
    engine: Engine, batch: int, context: int, steps: int, bandwidth: float
) -> DecodeResult:
    """Fills ``batch`` requests with ``context`` prompt tokens, then times ``steps`` decode
    steps (and ``steps`` more with CUDA graphs bypassed, when the engine captured them)."""
    graphs = engine.runner.cuda_graphs is not None
    preempted_before = engine.scheduler.num_preemptions
    ids = start_decoding(engine, batch, context, steps, phases=2 if graphs else 1)
    gap_before = _host_gap(engine)
    elapsed, running = _timed_steps(engine, steps)
    gap_after = _host_gap(engine)
    eager_ms = graph_ms = gap_ms = None
    if graphs:
        graph_ms = graph_replay_ms(engine, batch)
        gap_ms = 1e3 * (gap_after[0] - gap_before[0]) / max(1, gap_after[1] - gap_before[1])
        with engine.runner.eager():
            eager_ms = 1e3 * _timed_steps(engine, steps)[0] / steps
    preemptions = engine.scheduler.num_preemptions - preempted_before
    for rid in ids:
        engine.abort(rid)
    runner = engine.runner
    weight_bytes = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    kv_bytes = batch * (context + 4) * runner.block_bytes // runner.block_size
    floor_ms = 1e3 * (weight_bytes + kv_bytes) / bandwidth if bandwidth else 0.0
    step_ms = 1e3 * elapsed / steps
    return DecodeResult(
        batch,
        context,
        step_ms,
        running / elapsed,
        floor_ms,
        running / steps,
        preemptions,
        eager_ms,
        graph_ms,
        gap_ms,
    )


def start_decoding(engine: Engine, batch: int, context: int, steps: int, phases: int) -> list[str]:
    """Adds ``batch`` greedy requests of ``context`` random prompt tokens and steps until every
    prompt is prefilled; returns their ids (abort them when done). Each may generate enough
    tokens for ``phases`` rounds of warm-up and ``steps`` timed steps (requests whose prompt
    finished early decode while the others prefill, so they get room for that too)."""
    vocab = engine.runner.model_config.vocab_size
    gen = torch.Generator().manual_seed(batch * 7919 + context)
    sampling = SamplingParams(temperature=0.0, ignore_eos=True)
    ids = [f"bench-{batch}-{context}-{i}" for i in range(batch)]
    max_new = decode_tokens_needed(engine, batch, context, steps, phases)
    for rid in ids:
        engine.add_request(RequestSpec(rid, _random_prompt(vocab, context, gen), sampling, max_new))
    while any(
        r.num_computed_tokens < r.num_prompt_tokens
        for r in (*engine.scheduler.running, *engine.scheduler.waiting)
    ):
        engine.step()
    return ids


def mixed_step(engine: Engine, tokens: int, decodes: int, context: int) -> SchedulerOutput:
    """A step of ``tokens`` tokens: ``decodes`` requests of ``context`` tokens decoding one
    each, and the rest a prefill chunk at the end of a ``context``-token prompt, all over
    KV blocks from 0 up (call with no request running). Raises ValueError when the KV cache
    cannot hold them or the chunk would be empty or longer than the prompt."""
    chunk, bs = tokens - decodes, engine.runner.block_size
    if context + 1 > engine.max_model_len:
        raise ValueError(f"a context of {context} exceeds max_model_len {engine.max_model_len}")
    if not 0 < chunk <= context:
        raise ValueError(f"a {tokens}-token step of {decodes} decodes leaves a chunk of {chunk}")
    per_seq = -(-context // bs)
    if (decodes + 1) * per_seq > engine.pool.num_blocks:
        raise ValueError(f"{decodes + 1} sequences of {context} tokens exceed the KV cache")
    vocab, gen = engine.runner.model_config.vocab_size, torch.Generator().manual_seed(tokens)
    scheduled = []
    for i in range(decodes + 1):
        prompt = _random_prompt(vocab, context, gen)
        req = Request(f"mixed-{i}", prompt, SamplingParams(temperature=0.0), 2, frozenset())
        req.block_ids = list(range(i * per_seq, (i + 1) * per_seq))
        new = 1 if i < decodes else chunk
        req.num_computed_tokens = context - new
        scheduled.append(ScheduledRequest(req, new))
    return SchedulerOutput(scheduled=scheduled)


def bench_mixed(
    engine: Engine, tokens: int, decodes: int, context: int, reps: int = 20
) -> MixedResult:
    """Mean time of one mixed step (:func:`mixed_step`, run through ``ModelRunner.execute``:
    input preparation, the forward and sampling, synced by the sampled tokens), through the
    piecewise graphs and, when the engine has graphs, with them bypassed."""
    runner, out = engine.runner, mixed_step(engine, tokens, decodes, context)
    step_ms = _time_step(runner, out, reps)
    eager_ms = None
    if runner.cuda_graphs is not None:
        with runner.eager():
            eager_ms = _time_step(runner, out, reps)
    return MixedResult(tokens, decodes, context, step_ms, eager_ms)


def _time_step(runner: Any, out: SchedulerOutput, reps: int) -> float:
    """Mean ms of ``runner.execute(out)`` over ``reps`` runs, after WARMUP_STEPS."""
    for _ in range(WARMUP_STEPS):
        runner.execute(out)
    _sync(runner.device)
    t0 = time.perf_counter()
    for _ in range(reps):
        runner.execute(out)
    _sync(runner.device)
    return 1e3 * (time.perf_counter() - t0) / reps


def bench_chunk_depths(
    engine: Engine, contexts: list[int], tokens: int = 1024, reps: int = 10
) -> list[ChunkDepthResult]:
    """A ``tokens``-token prefill chunk ending at each of ``contexts`` (:func:`mixed_step`
    with no decodes), timed through ``ModelRunner.execute``. The shallowest depth is the
    baseline: the deeper ones differ from it in attention work only. Raises ValueError when
    a depth does not fit (:func:`mixed_step`)."""
    cfg, out = engine.runner.model_config, []
    for context in contexts:
        step = mixed_step(engine, tokens, 0, context)
        ms = _time_step(engine.runner, step, reps)
        out.append(
            ChunkDepthResult(tokens, context, ms, *chunk_flops(cfg, tokens, context - tokens))
        )
    return out


def _mixed_section(engine: Engine, context: int = 1024, decodes: int = 32) -> list[MixedResult]:
    """Mixed steps of each MIXED_TOKENS size (within the step budget), piecewise vs eager."""
    pieces = engine.runner.cuda_graphs and engine.runner.cuda_graphs.piecewise
    print(
        f"mixed steps: a prefill chunk + {decodes} decodes at {context} tokens of context; "
        + (f"piecewise graphs of {pieces.sizes} tokens" if pieces else "no graphs (eager)")
    )
    budget = engine.config.scheduler.max_num_batched_tokens
    out = []
    for tokens in (t for t in MIXED_TOKENS if t <= budget):
        try:
            r = bench_mixed(engine, tokens, decodes, context)
        except ValueError as e:
            print(f"mixed {tokens}: skipped ({e})")
            continue
        out.append(r)
        print(
            f"mixed {tokens:>5} tokens: {r.step_ms:.2f} ms; eager {_ms(r.eager_ms, 0)} ms; "
            f"eager / piecewise {r.speedup:.2f}"
        )
    return out


def _chunk_depth_section(
    engine: Engine, contexts: list[int], tokens: int = 1024, reps: int = 10
) -> list[ChunkDepthResult]:
    """Prints each depth's time beside the shallowest one's (the baseline, same run) and
    beside what its FLOPs alone predict; then the attention FLOP/s the slope implies."""
    try:
        results = bench_chunk_depths(engine, sorted(contexts), tokens, reps)
    except ValueError as e:
        print(f"chunk depths: skipped ({e})")
        return []
    base = results[0]
    print(f"prefill chunk of {base.tokens} tokens by the context it ends at (no decodes):")
    for r in results:
        print(
            f"chunk at {r.context:>6}: {r.step_ms:7.2f} ms, {r.tflops_per_s:6.1f} TFLOP/s, "
            f"attention {r.attention_flops / r.flops:5.1%} of FLOPs; "
            f"time x{r.step_ms / base.step_ms:.2f} vs FLOPs x{r.flops / base.flops:.2f} "
            f"the {base.context}-token chunk's"
        )
    last = results[-1]
    if len(results) > 1 and last.step_ms > base.step_ms:
        rate = (last.attention_flops - base.attention_flops) / (last.step_ms - base.step_ms)
        print(
            f"attention beyond the baseline runs at {rate / 1e9:.1f} TFLOP/s "
            f"(the {base.context}-token chunk as a whole: {base.tflops_per_s:.1f} TFLOP/s)"
        )
    return results


def _host_gap(engine: Engine) -> tuple[float, int]:
    """(seconds, intervals) of the runner's host-gap clock so far; (0, 0) without graphs."""
    graphs = engine.runner.cuda_graphs
    return (graphs.host_gap.total_s, graphs.host_gap.count) if graphs else (0.0, 0)


def graph_replay_ms(engine: Engine, batch: int, iters: int = 20) -> float | None:
    """GPU ms of one replay of the decode graph a step of ``batch`` requests uses, replayed
    ``iters`` times back to back (CUDA events) over the inputs of the last step: it rewrites
    that step's KV slots with the same values. None when the last step replayed another size
    (its inputs may name blocks that other requests hold now)."""
    graphs = engine.runner.cuda_graphs
    size = padded_batch_size(batch, graphs.sizes)
    if size is None or graphs.last_size != size:
        return None
    graph = graphs.graphs[size]
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def decode_tokens_needed(
    engine: Engine, batch: int, context: int, steps: int, phases: int = 1
) -> int:
    """Tokens a request may generate before the timed steps end: the prefill steps of the whole
    batch (budget-bound) plus ``phases`` rounds of warm-up and timed steps, with slack."""
    prefill_steps = -(-batch * context // engine.config.scheduler.max_num_batched_tokens)
    return prefill_steps + phases * (steps + WARMUP_STEPS) + 8


@torch.inference_mode()
def hf_decode_step_ms(model: torch.nn.Module, batch: int, context: int, steps: int) -> float:
    """Mean ms of one greedy decode step of a HF causal LM at ``batch`` x ``context``.

    Prefills random prompts into the model's own KV cache (``DynamicCache``, as ``generate``
    uses), then times ``steps`` steps of forward + argmax + reading the tokens back to the host
    (``generate`` reads them each step too, for its stopping check), after 2 warm-up steps.
    """
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(batch * 7919 + context)
    ids = torch.randint(0, model.config.vocab_size, (batch, context), generator=gen).to(device)
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    del out
    for i in range(WARMUP_STEPS + steps):
        if i == WARMUP_STEPS:
            _sync(device)
            t0 = time.perf_counter()
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
        token.tolist()
    _sync(device)
    return 1e3 * (time.perf_counter() - t0) / steps


def hf_baseline(
    config: EngineConfig, device: torch.device, points: tuple[tuple[int, int], ...], steps: int
) -> dict[tuple[int, int], float]:
    """HF ``LlamaForCausalLM(LlamaConfig(**config.json))`` with random weights in the engine's
    dtype on ``device``: its decode step ms at each (batch, context). Frees the model and its
    cache before returning. Raises ImportError without transformers."""
    import transformers

    raw = json.loads((Path(config.model_path) / "config.json").read_text())
    previous = torch.get_default_dtype()
    torch.set_default_dtype(parse_dtype(config.dtype, str(device)))
    try:
        with torch.device(device):
            model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**raw)).eval()
    finally:
        torch.set_default_dtype(previous)
    try:
        return {p: hf_decode_step_ms(model, *p, steps) for p in points}
    finally:
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def run_engine_bench(
    config: EngineConfig,
    batches: list[int],
    contexts: list[int],
    steps: int = 32,
    out_json: str | None = None,
    prefill: bool = True,
    hf: bool = True,
    profile: list[int] | None = None,
    mixed_steps: bool = True,
    chunk_depths: list[int] | None = None,
) -> list[DecodeResult]:
    """The decode grid (``batches`` x ``contexts``), the HF baseline, prefill at 8k tokens,
    mixed steps (``mixed_steps``), a 1,024-token prefill chunk at each of ``chunk_depths``
    and,
    for each batch in ``profile``, a per-kernel table of its decode graph at every context
    (last, so that the profiler's tracing slows none of the timed points)."""
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    bandwidth = copy_bandwidth(device) if device.type == "cuda" else 0.0
    hf_ms = _hf_section(config, device, steps) if hf else {}
    engine = Engine(config, device)
    graphs = engine.runner.cuda_graphs
    print(
        f"device {device}; copy bandwidth {bandwidth / 1e12:.2f} TB/s; "
        f"KV blocks {engine.pool.num_blocks}; CUDA graphs "
        + (f"for decode batches {graphs.sizes}" if graphs else "off (eager)")
    )
    results = _decode_grid(engine, batches, contexts, steps, bandwidth)
    hf_results = _compare_hf(engine, hf_ms, results, steps, bandwidth)
    prefills = _prefill_section(engine, device) if prefill else []
    mixed = _mixed_section(engine) if mixed_steps else []
    depths = _chunk_depth_section(engine, chunk_depths) if chunk_depths else []
    profiles = _profile_section(engine, profile or [], contexts, bandwidth)
    if out_json:
        report = {
            "bandwidth_Bps": bandwidth,
            "device": str(device),
            "cuda_graph_sizes": graphs.sizes if graphs else [],
            "results": [
                asdict(r) | {"vs_floor": r.vs_floor, "graph_speedup": r.graph_speedup}
                for r in results
            ],
            "prefill": [asdict(p) | {"vs_matmul": p.vs_matmul} for p in prefills],
            "mixed": [asdict(m) | {"speedup": m.speedup} for m in mixed],
            "chunk_depths": [asdict(d) | {"tflops_per_s": d.tflops_per_s} for d in depths],
            "hf": [asdict(h) | {"speedup": h.speedup} for h in hf_results],
            "profile": [asdict(p) | {"idle_us": p.idle_us} for p in profiles],
        }
        Path(out_json).write_text(json.dumps(report, indent=2))
    return results


def _decode_grid(
    engine: Engine, batches: list[int], contexts: list[int], steps: int, bandwidth: float
) -> list[DecodeResult]:
    results = []
    print(
        f"{'batch':>6} {'ctx':>6} {'step ms':>9} {'tok/s':>10} {'floor ms':>9} {'x floor':>8} "
        f"{'running':>8} {'preempt':>8} {'eager ms':>9} {'graph x':>8} {'replay ms':>10} "
        f"{'host gap ms':>12}"
    )
    for ctx in contexts:
        for b in batches:
            phases = 2 if engine.runner.cuda_graphs else 1
            tokens = ctx + decode_tokens_needed(engine, b, ctx, steps, phases)
            need = b * engine.kv.blocks_needed(tokens)
            if need > engine.pool.num_blocks:
                print(f"{b:>6} {ctx:>6}   skipped: needs {need} KV blocks")
                continue
            r = bench_decode(engine, b, ctx, steps, bandwidth)
            results.append(r)
            print(
                f"{b:>6} {ctx:>6} {r.step_ms:>9.2f} {r.tokens_per_s:>10.1f} "
                f"{r.floor_ms:>9.2f} {r.vs_floor:>8.2f} {r.mean_running:>8.1f} {r.preemptions:>8} "
                f"{_ms(r.eager_step_ms, 9)} {r.graph_speedup:>8.2f} {_ms(r.graph_ms, 10)} "
                f"{_ms(r.host_gap_ms, 12)}"
            )
    return results


def _ms(value: float | None, width: int) -> str:
    return f"{value:>{width}.2f}" if value is not None else f"{'-':>{width}}"


def _hf_section(
    config: EngineConfig, device: torch.device, steps: int
) -> dict[tuple[int, int], float]:
    """The HF baseline, or {} (with the reason printed) when it cannot run here."""
    if device.type != "cuda":
        print("HF transformers baseline: skipped (CUDA only)")
        return {}
    try:
        return hf_baseline(config, device, HF_POINTS, steps)
    except Exception as e:  # the bench still reports everything else
        print(f"HF transformers baseline: skipped ({type(e).__name__}: {e})")
        gc.collect()
        torch.cuda.empty_cache()
        return {}


def _compare_hf(
    engine: Engine,
    hf_ms: dict[tuple[int, int], float],
    results: list[DecodeResult],
    steps: int,
    bandwidth: float,
) -> list[HfResult]:
    """Prints ours beside HF at each HF point, running our point if the grid skipped it."""
    out = []
    for (batch, ctx), hf_step in hf_ms.items():
        ours = next((r for r in results if (r.batch, r.context) == (batch, ctx)), None)
        if ours is None:
            ours = bench_decode(engine, batch, ctx, steps, bandwidth)
        h = HfResult(batch, ctx, hf_step, ours.step_ms)
        out.append(h)
        print(
            f"HF transformers decode step, batch {batch}, ctx {ctx}: HF {h.hf_step_ms:.2f} ms, "
            f"ours {h.ours_step_ms:.2f} ms; HF / ours {h.speedup:.2f}"
        )
    return out


def _prefill_section(engine: Engine, device: torch.device) -> list[PrefillResult]:
    """Prefill throughput at each PREFILL_SHAPES point beside the matmul rate (CUDA only)."""
    if device.type != "cuda":
        print("prefill: skipped (CUDA only: its ceiling is the bf16 matmul rate)")
        return []
    rate = matmul_flops_per_s(device)
    budget = engine.config.scheduler.max_num_batched_tokens
    print(f"bf16 matmul 8192^3: {rate / 1e12:.1f} TFLOP/s; step token budget {budget}")
    out = []
    for num_seqs, length in PREFILL_SHAPES:
        if length > engine.max_model_len:
            print(f"prefill {num_seqs} x {length}: skipped (max_model_len {engine.max_model_len})")
            continue
        seconds = bench_prefill(engine, num_seqs, length)
        flops = prefill_flops(engine.runner.model_config, [length] * num_seqs)
        p = PrefillResult(num_seqs, length, seconds, flops, rate)
        out.append(p)
        print(
            f"prefill {num_seqs} x {length}: {1e3 * seconds:.1f} ms, {p.tokens_per_s:,.0f} tok/s, "
            f"{p.tflops_per_s:.1f} TFLOP/s = {p.vs_matmul:.2f} x matmul"
        )
    return out


def _profile_section(
    engine: Engine, batches: list[int], contexts: list[int], bandwidth: float
) -> list[StepProfile]:
    """For each (batch, context): the per-kernel table of the decode graph the point replays
    (``bench_profile``), printed and returned; a clear line instead where it cannot run."""
    if not batches:
        return []
    graphs = engine.runner.cuda_graphs
    if graphs is None:
        print(
            f"profile: skipped (no CUDA graphs on {engine.runner.device}: the per-kernel "
            "table replays a captured decode graph; it needs CUDA, the triton backend and no "
            "--enforce-eager)"
        )
        return []
    out = []
    for ctx in contexts:
        for batch in batches:
            try:
                p = profile_point(engine, batch, ctx)
            except Exception as e:  # the bench has already reported everything else
                print(f"profile batch {batch}, ctx {ctx}: skipped ({type(e).__name__}: {e})")
                continue
            out.append(p)
            print(format_profile(p, bandwidth))
    return out


def profile_point(engine: Engine, batch: int, context: int, replays: int = 20) -> StepProfile:
    """Fills ``batch`` requests of ``context`` tokens, decodes a few steps so that the graph
    of their size holds valid inputs, then profiles ``replays`` replays of it
    (:func:`~workers.bench_profile.profile_decode_graph`) beside its back-to-back replay time.
    Raises ValueError when no captured graph holds ``batch`` or the KV cache cannot."""
    graphs = engine.runner.cuda_graphs
    size = padded_batch_size(batch, graphs.sizes)
    if size is None:
        raise ValueError(f"no captured graph holds {batch} requests (sizes {graphs.sizes})")
    tokens = context + decode_tokens_needed(engine, batch, context, 0)
    need = batch * engine.kv.blocks_needed(tokens)
    if need > engine.pool.num_blocks:
        raise ValueError(f"needs {need} KV blocks, the cache has {engine.pool.num_blocks}")
    ids = start_decoding(engine, batch, context, 0, phases=1)
    try:
        for _ in range(WARMUP_STEPS):
            engine.step()
        replay_ms = graph_replay_ms(engine, batch)
        events = profile_decode_graph(graphs.graphs[size], replays)
    finally:
        for rid in ids:
            engine.abort(rid)
    model = engine.runner.model
    per_layer, head = model_projections(model)
    elem = next(model.parameters()).element_size()
    gemms = attribute_gemms(events, per_layer, head, size, elem)
    replay_us = 1e3 * replay_ms if replay_ms is not None else None
    return build_profile(events, batch, context, size, replay_us, gemms)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
