"""``kunserve replay`` against a real server: the Azure code trace's burst, time-scaled."""

from __future__ import annotations

from pathlib import Path

from tests.client.replay_helpers import BURST_DURATION_S, check_replay_result, run_burst_replay
from tests.server_harness import ServerProcess


def test_burst_window_against_real_server(server: ServerProcess, tmp_path: Path) -> None:
    result = run_burst_replay("127.0.0.1", server.port, tmp_path, max_output_len=16)
    doc = check_replay_result(result)
    assert BURST_DURATION_S == 60.0
    assert len(result.records) == 583  # the trace's arrivals in [826 s, 886 s)
    assert result.metrics.completed == 583 and result.metrics.failed == 0
    # stories260K's context is 512 tokens; most of this trace's prompts are longer.
    assert doc["num_clipped_input"] > 400
    # KV usage and instance states were sampled from GetServerInfo while it ran.
    assert len(result.samples) >= 4
    assert max(sum(i.kv_blocks_used for i in s.instances) for s in result.samples) > 0
    assert result.plot_path.stat().st_size > 10_000
