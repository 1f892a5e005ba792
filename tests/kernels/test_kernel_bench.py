"""``python -m kernels.bench --only chunks`` (GPU only: it times with CUDA events)."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.gpu
def test_chunk_attention_bench_times_each_tile_config_and_checks_it_against_sdpa() -> None:
    from kernels.bench import bench_chunk_attention

    tiles = ((64, 32, 4, 2), (128, 64, 8, 3))
    rows = bench_chunk_attention(torch.device("cuda"), 512, chunk=128, tiles=tiles)
    assert [tuple(r["tiles"]) for r in rows] == list(tiles)
    for r in rows:
        assert not r["errors"], r["errors"]
        assert r["ours_us"] > 0 and r["baseline_us"] > 0
        assert r["max_abs_diff"] < 0.05 and r["ours_tflops"] > 0


def test_the_kernel_bench_names_an_unknown_table() -> None:
    from kernels.bench import run_kernel_bench

    with pytest.raises(ValueError, match="only must be None, 'skinny', 'mixed' or 'chunks'"):
        run_kernel_bench(only="chunk")


def test_kunserve_bench_kernels_passes_only_through(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import kernels.bench
    from coordinator.cli import main

    calls = []
    monkeypatch.setattr(kernels.bench, "run_kernel_bench", lambda *a: calls.append(a))
    assert main(["bench", "kernels", "--only", "chunks", "--output-json", "k.json"]) == 0
    assert calls == [("k.json", "chunks")]
    with pytest.raises(SystemExit):
        main(["bench", "kernels", "--only", "chunk"])
    assert "invalid choice: 'chunk'" in capsys.readouterr().err


def test_the_chunk_sweep_starts_with_the_default_tiles() -> None:
    from kernels.bench import CHUNK_TILES, HEAD_DIM
    from kernels.paged_prefill import prefill_tiles

    assert CHUNK_TILES[0] == tuple(prefill_tiles(HEAD_DIM))
    assert len(set(CHUNK_TILES)) == len(CHUNK_TILES)
