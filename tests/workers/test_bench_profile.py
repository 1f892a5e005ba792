"""The per-kernel decode profile (``bench engine --profile``).

CPU tests feed the pure functions fake profiler events (objects shaped like torch's
``FunctionEvent``: ``name``, ``device_type``, ``time_range.start/end`` in µs) and check the
table's numbers exactly; the bench on CPU must say why it cannot profile. The ``gpu`` test
profiles a real captured graph of a small dummy model.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from attention.backends import TorchBackend
from tests.workers.engine_helpers import write_dummy_gqa_config
from workers.bench import profile_point, run_engine_bench
from workers.bench_profile import (
    GemmRow,
    KernelEvent,
    Projection,
    attribute_gemms,
    build_profile,
    device_events,
    format_profile,
    model_projections,
    short_kernel_name,
    split_replays,
)
from workers.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from workers.engine import Engine
from workers.models.llama import LlamaModel

CUDA_TYPE = torch.autograd.DeviceType.CUDA
CPU_TYPE = torch.autograd.DeviceType.CPU
GEMM = "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_cublas"
REDUCE = "void cublasLt::splitKreduce_kernel<32, 16, int, float>(cublasLt::Params<float>, int)"
NORM = "_fused_add_rms_norm_kernel"
ATTN = "_paged_decode_kernel"


def fake_event(name: str, start: float, end: float, device_type: object = CUDA_TYPE) -> object:
    """An object with the fields of torch.autograd.profiler_util.FunctionEvent we read."""
    return SimpleNamespace(
        name=name, device_type=device_type, time_range=SimpleNamespace(start=start, end=end)
    )


def burst(t0: float, kernels: list[tuple[str, float]], gap: float = 1.0) -> list[KernelEvent]:
    """Kernels of (name, µs) back to back from ``t0`` with ``gap`` µs of idle between them."""
    out, t = [], t0
    for name, us in kernels:
        out.append(KernelEvent(name, t, t + us))
        t += us + gap
    return out


def one_layer_step(attn_us: float = 8.0) -> list[tuple[str, float]]:
    """The kernels of a one-layer decode step: norm, qkv (split-K), attention, o, norm,
    gate/up, SiLU, down, then the final norm, LM head and argmax."""
    return [
        (NORM, 2.0),
        (GEMM, 5.0),
        (REDUCE, 1.0),
        (ATTN, attn_us),
        (GEMM, 3.0),
        (NORM, 2.0),
        (GEMM, 10.0),
        ("_silu_and_mul_kernel", 1.0),
        (GEMM, 6.0),
        (NORM, 2.0),
        (GEMM, 20.0),
        ("void at::native::reduce_kernel<512, 1, ReduceOp<float, ArgMaxOps<float>>>()", 4.0),
    ]


def test_device_events_keeps_gpu_events_sorted_by_start() -> None:
    events = [
        fake_event("b", 30.0, 35.0),
        fake_event("cudaGraphLaunch", 0.0, 12.0, CPU_TYPE),
        fake_event("a", 10.0, 20.0),
    ]
    assert device_events(events) == [KernelEvent("a", 10.0, 20.0), KernelEvent("b", 30.0, 35.0)]


def test_split_replays_cuts_at_idle_gaps_only() -> None:
    first = burst(0.0, [("a", 5.0), ("b", 5.0)], gap=50.0)  # 50 µs inside one replay
    second = burst(2000.0, [("a", 5.0), ("b", 5.0)])
    groups = split_replays([*first, *second], min_gap_us=1000.0)
    assert groups == [first, second]
    assert split_replays([], min_gap_us=1000.0) == []


def test_build_profile_averages_per_step_and_measures_idle_time() -> None:
    replays = [burst(0.0, one_layer_step(8.0)), burst(5000.0, one_layer_step(10.0))]
    p = build_profile(replays, batch=1, context=1024, graph_size=1, replay_us=90.0)
    rows = {r.name: (r.count, r.us) for r in p.rows}
    assert rows[GEMM] == (5.0, 44.0)
    assert rows[NORM] == (3.0, 6.0)
    assert rows[ATTN] == (1.0, 9.0)
    assert p.rows[0].name == GEMM  # largest first
    assert p.kernel_us == 65.0  # 64 or 66 µs of kernels per replay
    assert p.span_us == 76.0  # plus 11 gaps of 1 µs
    assert p.idle_us == 11.0
    assert p.step_us == 90.0  # the replay time when measured
    assert (p.replays, p.batch, p.context, p.graph_size) == (2, 1, 1024, 1)


def test_build_profile_without_events_raises() -> None:
    with pytest.raises(ValueError, match="no GPU events"):
        build_profile([], batch=1, context=1, graph_size=1)


PER_LAYER = [
    Projection("qkv_proj", 64, 128, 1),
    Projection("o_proj", 64, 64, 1),
    Projection("gate_up_proj", 64, 344, 1),
    Projection("down_proj", 172, 64, 1),
]
HEAD = Projection("lm_head", 64, 512, 1)


def test_attribute_gemms_names_each_matmul_by_its_place_with_its_split_k_reduction() -> None:
    replays = [burst(0.0, one_layer_step()), burst(5000.0, one_layer_step())]
    gemms = attribute_gemms(replays, PER_LAYER, HEAD, rows=1, elem_bytes=2)
    assert gemms == [
        GemmRow("qkv_proj", 2.0, 6.0, (64 * 128 + 64 + 128) * 2),
        GemmRow("o_proj", 1.0, 3.0, (64 * 64 + 64 + 64) * 2),
        GemmRow("gate_up_proj", 1.0, 10.0, (64 * 344 + 64 + 344) * 2),
        GemmRow("down_proj", 1.0, 6.0, (172 * 64 + 172 + 64) * 2),
        GemmRow("lm_head", 1.0, 20.0, (64 * 512 + 64 + 512) * 2),
    ]
    assert gemms[-1].bytes_per_s == pytest.approx(gemms[-1].bytes / 20e-6)


def test_attribute_gemms_counts_each_skinny_gemm_as_a_matmul_of_its_own() -> None:
    """decode_gemm='triton': the norms and SiLU are fused into the skinny GEMMs, so o, gate/up,
    down and the next layer's qkv follow each other; cuBLAS's LM head still takes its reduce."""
    skinny = "_skinny_gemm_kernel"
    step = [
        (skinny, 5.0),
        (ATTN, 8.0),
        (skinny, 3.0),
        (skinny, 10.0),
        (skinny, 6.0),
        (NORM, 2.0),
        (GEMM, 20.0),
        (REDUCE, 1.0),
    ]
    gemms = attribute_gemms([burst(0.0, step)], PER_LAYER, HEAD, rows=1, elem_bytes=2)
    assert gemms is not None
    assert [(g.name, g.kernels, g.us) for g in gemms] == [
        ("qkv_proj", 1.0, 5.0),
        ("o_proj", 1.0, 3.0),
        ("gate_up_proj", 1.0, 10.0),
        ("down_proj", 1.0, 6.0),
        ("lm_head", 2.0, 21.0),
    ]


def test_attribute_gemms_gives_up_on_an_unexpected_number_of_matmuls() -> None:
    replays = [burst(0.0, one_layer_step())]
    two_layers = [Projection(p.name, p.in_features, p.out_features, 2) for p in PER_LAYER]
    assert attribute_gemms(replays, two_layers, HEAD, rows=1, elem_bytes=2) is None
    assert attribute_gemms(replays, PER_LAYER, None, rows=1, elem_bytes=2) is None


def test_projection_bytes_count_weights_and_rows_of_every_layer() -> None:
    p = Projection("down_proj", 14336, 4096, 32)
    assert p.bytes_moved(rows=64, elem_bytes=2) == 32 * (14336 * 4096 + 64 * (14336 + 4096)) * 2


def test_model_projections_follow_the_layer_order(stories_dir: Path) -> None:
    cfg = ModelConfig.from_dir(stories_dir)
    with torch.device("meta"):
        model = LlamaModel(cfg, TorchBackend())
    per_layer, head = model_projections(model)
    assert per_layer == [
        Projection("qkv_proj", 64, 128, 5),  # 8 query + 2 x 4 KV heads of 8
        Projection("o_proj", 64, 64, 5),
        Projection("gate_up_proj", 64, 344, 5),
        Projection("down_proj", 172, 64, 5),
    ]
    assert head == Projection("lm_head", 64, 512, 1)


@pytest.mark.parametrize(
    ("name", "short"),
    [
        ("_paged_decode_kernel", "_paged_decode_kernel"),
        (
            "void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<c10::"
            "BFloat16>, std::array<char*, 1ul> >(int, at::native::FillFunctor<c10::BFloat16>)",
            "vectorized_elementwise_kernel<FillFunctor>",
        ),
        (
            "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>,"
            " std::array<char*, 3ul> >(int)",
            "vectorized_elementwise_kernel<CUDAFunctor_add>",
        ),
        (
            "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::"
            "ArgMaxOps<float>, unsigned int, long, 4> >(at::native::ReduceOp<float>)",
            "reduce_kernel<ArgMaxOps>",
        ),
        (REDUCE, "splitKreduce_kernel<…>"),
        ("Memcpy DtoD (Device -> Device)", "Memcpy DtoD (Device -> Device)"),
        ("x" * 60, "x" * 55 + "…"),
    ],
)
def test_short_kernel_name(name: str, short: str) -> None:
    assert short_kernel_name(name) == short


def test_format_profile_prints_rows_and_the_step_split() -> None:
    replays = [burst(0.0, one_layer_step(8.0)), burst(5000.0, one_layer_step(10.0))]
    gemms = attribute_gemms(replays, PER_LAYER, HEAD, rows=1, elem_bytes=2)
    p = build_profile(replays, batch=1, context=1024, graph_size=1, replay_us=100.0, gemms=gemms)
    lines = format_profile(p, bandwidth=4e12).splitlines()
    assert lines[0].startswith("decode graph kernels: batch 1, ctx 1024, graph size 1, mean of 2")
    assert lines[2].split() == [GEMM, "5", "44.0", "44.0"]
    assert lines[3].split() == ["_paged_decode_kernel", "1", "9.0", "9.0"]
    assert (
        "kernels, summed                                               12      65.0    65.0"
        in lines
    )
    text = "\n".join(lines)
    assert "idle between kernels inside the graph" in text and "11.0    11.0" in text
    assert "launch gap between back-to-back replays" in text and "24.0    24.0" in text
    assert "over the copy bandwidth 4.00 TB/s" in text
    lm = next(line for line in lines if line.startswith("lm_head"))
    assert lm.split()[:3] == ["lm_head", "1", "20.0"]


def test_format_profile_says_when_gemms_were_not_attributed() -> None:
    p = build_profile([burst(0.0, [(NORM, 2.0)])], batch=8, context=4096, graph_size=8)
    text = format_profile(p, bandwidth=0.0)
    assert "GEMMs by projection: not attributed" in text
    assert "launch gap" not in text  # no replay time measured: percentages of the span


def cpu_config(stories_dir: Path) -> EngineConfig:
    """stories260K on CPU: 64 blocks of 4 tokens, a 64-token step budget, 96 tokens of context."""
    return EngineConfig(
        model_path=str(stories_dir),
        dtype="float32",
        attention_backend="torch",
        cache=CacheConfig(block_size=4, num_kv_blocks=64),
        scheduler=SchedulerConfig(max_num_batched_tokens=64, max_model_len=96),
    )


def test_bench_on_cpu_says_why_it_cannot_profile(
    stories_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = cpu_config(stories_dir)
    results = run_engine_bench(config, [1], [8], steps=2, prefill=False, hf=False, profile=[1])
    assert [(r.batch, r.context) for r in results] == [(1, 8)]
    out = capsys.readouterr().out
    assert "profile: skipped (no CUDA graphs on cpu" in out


@pytest.mark.gpu
def test_profile_point_names_every_gemm_of_a_captured_graph(tmp_path: Path) -> None:
    config = EngineConfig(
        model_path=str(write_dummy_gqa_config(tmp_path, num_layers=4)),
        load_format="dummy",
        dtype="bfloat16",
        attention_backend="triton",
        cache=CacheConfig(block_size=16, num_kv_blocks=512),
        scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=1024),
    )
    engine = Engine(config, torch.device("cuda"))
    try:
        p = profile_point(engine, batch=3, context=100, replays=5)
        assert engine.pool.num_used == 0  # the point's requests were aborted
    finally:
        engine.close()
    assert (p.batch, p.context, p.graph_size, p.replays) == (3, 100, 4, 5)
    assert p.gemms is not None, format_profile(p, 0.0)
    assert [g.name for g in p.gemms] == [
        "qkv_proj",
        "o_proj",
        "gate_up_proj",
        "down_proj",
        "lm_head",
    ]
    assert p.rows and 0 < p.kernel_us <= p.span_us
    assert p.replay_us is not None and p.replay_us > 0


def test_mixed_step_is_a_chunk_beside_decodes_and_the_bench_times_it_on_cpu(
    stories_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from workers.bench import bench_mixed, mixed_step

    config = cpu_config(stories_dir)
    engine = Engine(config, torch.device("cpu"))
    out = mixed_step(engine, 24, 4, 40)
    assert [s.num_new_tokens for s in out.scheduled] == [1, 1, 1, 1, 20]
    assert [s.request.num_computed_tokens for s in out.scheduled] == [39] * 4 + [20]
    blocks = [b for s in out.scheduled for b in s.request.block_ids]
    assert blocks == list(range(50))  # 10 blocks of 4 tokens each, none shared
    for bad, match in (
        ((24, 4, 96), "exceeds max_model_len 96"),
        ((50, 4, 40), "leaves a chunk of 46"),
        ((24, 8, 40), "9 sequences of 40 tokens exceed the KV cache"),
    ):
        with pytest.raises(ValueError, match=match):
            mixed_step(engine, *bad)
    r = bench_mixed(engine, 24, 4, 40, reps=2)
    assert r.step_ms > 0 and r.eager_ms is None  # no graphs on CPU: nothing to compare
    run_engine_bench(config, [1], [8], steps=2, prefill=False, hf=False)
    assert "mixed 64: skipped (a context of 1024 exceeds max_model_len 96)" in (
        capsys.readouterr().out
    )


def test_chunk_depths_time_one_chunk_at_each_context_against_the_shallowest_on_cpu(
    stories_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The chunk's FLOPs grow with the context it ends at by its attention pairs alone
    (``chunk_flops``: a 16-token chunk from position 24 has 16 * 24 + 16 * 17 / 2 pairs per
    head and layer); the section prints each depth beside the shallowest."""
    from workers.bench import _chunk_depth_section, bench_chunk_depths, chunk_flops

    config = cpu_config(stories_dir)
    engine = Engine(config, torch.device("cpu"))
    cfg = engine.runner.model_config
    total, attn = chunk_flops(cfg, 16, 24)
    assert attn == 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * (16 * 24 + 136)
    assert total - attn == chunk_flops(cfg, 16, 0)[0] - chunk_flops(cfg, 16, 0)[1]
    shallow, deep = bench_chunk_depths(engine, [16, 40], tokens=16, reps=2)
    assert (shallow.context, deep.context) == (16, 40)
    assert deep.flops - shallow.flops == deep.attention_flops - shallow.attention_flops > 0
    assert shallow.step_ms > 0 and deep.step_ms > 0
    with pytest.raises(ValueError, match="exceeds max_model_len 96"):
        bench_chunk_depths(engine, [16, 96], tokens=16)
    capsys.readouterr()
    _chunk_depth_section(engine, [40, 16], tokens=16, reps=2)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "prefill chunk of 16 tokens by the context it ends at (no decodes):"
    assert lines[1].startswith("chunk at     16:") and "time x1.00 vs FLOPs x1.00" in lines[1]
    assert lines[2].startswith("chunk at     40:") and "the 16-token chunk's" in lines[2]
    run_engine_bench(
        config, [1], [8], steps=2, prefill=False, hf=False, mixed_steps=False,
        chunk_depths=[40, 16],
    )  # fmt: skip
    assert "chunk depths: skipped (a 1024-token step of 0 decodes leaves a chunk of 1024)" in (
        capsys.readouterr().out
    )
