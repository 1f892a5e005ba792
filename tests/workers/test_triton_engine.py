"""The engine on the Triton backend (CPU, Triton interpreter) against the torch backend.

The same engine steps as on a GPU: chunked prefill over a cached prefix (the prefill kernel),
mixed prefill + decode steps, then decode-only steps (the paged decode kernel), with the
fused RoPE + KV write, RMSNorm and SiLU kernels in every layer. The interpreter takes about
0.4 s per step at this size, so the case is small: 2 golden prompts x 8 tokens. The same
engine with ``decode_gemm="triton"`` (the fused skinny GEMMs for decode) is compared with
``"cublas"``, on CPU and, marked ``gpu``, inside captured decode graphs.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from attention.backends import get_backend
from coordinator.cli import add_engine_args, engine_config
from tests.workers.engine_helpers import run_to_completion
from workers.config import CacheConfig, EngineConfig, SchedulerConfig
from workers.engine import Engine, RequestSpec
from workers.request import SamplingParams

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = torch.device("cpu")
NEW_TOKENS = 8


def test_triton_backend_matches_torch_with_chunked_prefill(
    stories_dir: Path, golden_cases: list[dict]
) -> None:
    pytest.importorskip("triton")
    cases = [golden_cases[2], golden_cases[5]]  # prompts of 5 and 14 tokens
    outputs = {}
    for backend in ("torch", "triton"):
        config = EngineConfig(
            model_path=str(stories_dir),
            dtype="float32",
            attention_backend=backend,
            cache=CacheConfig(block_size=4, num_kv_blocks=64),
            # 6 tokens a step: the 14-token prompt takes 3 chunks, beside the other's decodes.
            scheduler=SchedulerConfig(max_num_batched_tokens=6, max_model_len=96),
        )
        engine = Engine(config, CPU)
        assert engine.runner.backend.name == backend
        for i, case in enumerate(cases):
            engine.add_request(
                RequestSpec(str(i), case["input_ids"], SamplingParams(temperature=0.0), NEW_TOKENS)
            )
        outputs[backend] = run_to_completion(engine)
    expected = {str(i): c["greedy_new_token_ids"][:NEW_TOKENS] for i, c in enumerate(cases)}
    assert outputs["triton"] == outputs["torch"] == expected


def test_decode_gemm_is_validated_and_set_by_the_cli(stories_dir: Path) -> None:
    assert EngineConfig(model_path=str(stories_dir)).decode_gemm == "cublas"
    with pytest.raises(ValueError, match="decode_gemm"):
        EngineConfig(model_path=str(stories_dir), decode_gemm="cutlass")
    with pytest.raises(ValueError, match="decode_gemm"):
        get_backend("triton", CPU, "cutlass")
    assert get_backend("torch", CPU, "triton").name == "torch"  # torch's matmul regardless
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    for argv, expected in (([], "cublas"), (["--decode-gemm", "triton"], "triton")):
        assert engine_config(parser.parse_args(argv), stories_dir).decode_gemm == expected


def test_skinny_gemm_decode_matches_cublas(
    stories_dir: Path, golden_cases: list[dict], monkeypatch: pytest.MonkeyPatch
) -> None:
    """decode_gemm='triton': every step of at most 16 tokens runs its projections through the
    fused skinny GEMMs (kernels/skinny_gemm.py), token for token what 'cublas' gives. One
    prefill step of 19 tokens (torch's matmul), then decode steps of 2 rows (the tl.dot path)
    and, once the first request is done, of 1 row (the CUDA-core path)."""
    pytest.importorskip("triton")
    from kernels import skinny_gemm

    calls = {"rms_norm_linear": 0, "skinny_linear": 0, "silu_and_mul_linear": 0}
    for name in calls:
        monkeypatch.setattr(skinny_gemm, name, _counting(getattr(skinny_gemm, name), calls, name))
    cases = [golden_cases[2], golden_cases[5]]  # prompts of 5 and 14 tokens
    outputs = {}
    for decode_gemm in ("cublas", "triton"):
        config = EngineConfig(
            model_path=str(stories_dir),
            dtype="float32",
            attention_backend="triton",
            decode_gemm=decode_gemm,
            cache=CacheConfig(block_size=4, num_kv_blocks=64),
            scheduler=SchedulerConfig(max_num_batched_tokens=32, max_model_len=96),
        )
        engine = Engine(config, CPU)
        lengths = (NEW_TOKENS // 2, NEW_TOKENS)
        for i, (case, n) in enumerate(zip(cases, lengths, strict=True)):
            engine.add_request(
                RequestSpec(str(i), case["input_ids"], SamplingParams(temperature=0.0), n)
            )
        outputs[decode_gemm] = run_to_completion(engine)
        if decode_gemm == "cublas":
            assert calls == dict.fromkeys(calls, 0)
    assert outputs["triton"] == outputs["cublas"]
    decode_steps, layers = NEW_TOKENS - 1, 5
    assert calls["skinny_linear"] == calls["silu_and_mul_linear"] == decode_steps * layers
    assert calls["rms_norm_linear"] == 2 * decode_steps * layers  # qkv and gate_up


def _counting(fn: Callable, calls: dict[str, int], name: str) -> Callable:
    def counted(*args: object, **kwargs: object) -> object:
        calls[name] += 1
        return fn(*args, **kwargs)

    return counted


@pytest.mark.gpu
def test_skinny_gemm_decode_graphs_match_cublas_on_a_gpu(
    stories_dir: Path, golden_cases: list[dict]
) -> None:
    """On CUDA with decode graphs captured: the skinny GEMMs replay inside the graphs (batches
    padded to 8, 4, 2, 1 as requests finish) and match 'cublas' token for token."""
    cuda = torch.device("cuda")
    outputs = {}
    for decode_gemm in ("cublas", "triton"):
        config = EngineConfig(
            model_path=str(stories_dir),
            dtype="float32",
            attention_backend="triton",
            decode_gemm=decode_gemm,
            cache=CacheConfig(block_size=16, num_kv_blocks=256),
            scheduler=SchedulerConfig(max_num_seqs=16, max_model_len=256),
        )
        engine = Engine(config, cuda)
        graphs = engine.runner.cuda_graphs
        assert graphs is not None
        for i, case in enumerate(golden_cases):
            engine.add_request(
                RequestSpec(str(i), case["input_ids"], SamplingParams(temperature=0.0), 4 + 3 * i)
            )
        outputs[decode_gemm] = run_to_completion(engine)
        assert graphs.num_replays > 0
    assert outputs["triton"] == outputs["cublas"]
