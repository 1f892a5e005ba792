"""The engine on the Triton backend (CPU, Triton interpreter) against the torch backend.

The same engine steps as on a GPU: chunked prefill over a cached prefix (the prefill kernel),
mixed prefill + decode steps, then decode-only steps (the paged decode kernel), with the
fused RoPE + KV write, RMSNorm and SiLU kernels in every layer. The interpreter takes about
0.4 s per step at this size, so the case is small: 2 golden prompts x 8 tokens.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

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
