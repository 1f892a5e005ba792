"""Helpers shared by the engine tests: run an engine until idle, write a small dummy config."""

from __future__ import annotations

import json
from pathlib import Path

from workers.engine import Engine


def run_to_completion(
    engine: Engine, preemptions: dict[str, int] | None = None
) -> dict[str, list[int]]:
    """Steps the engine until it is idle; returns each request's generated ids and fills
    ``preemptions`` (if given) with each request's preemption count. Asserts that the block pool
    is intact and empty afterwards."""
    tokens: dict[str, list[int]] = {}
    while engine.has_work:
        for o in engine.step():
            tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
            if preemptions is not None:
                preemptions[o.request_id] = o.num_preemptions
    engine.pool.check_integrity()
    assert engine.pool.num_used == 0
    return tokens


def write_dummy_gqa_config(model_dir: Path, num_layers: int) -> Path:
    """A small GQA Llama config (8 query / 2 KV heads, head_dim 64) for dummy weights."""
    cfg = {
        "model_type": "llama",
        "hidden_size": 512,
        "intermediate_size": 1024,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "vocab_size": 1000,
        "max_position_embeddings": 1024,
        "eos_token_id": 2,
    }
    (model_dir / "config.json").write_text(json.dumps(cfg))
    return model_dir
