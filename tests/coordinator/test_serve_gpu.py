"""The end-to-end suite against a server whose worker runs on a GPU (float32, stories260K)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.coordinator.test_serve_e2e import (  # noqa: F401 (collected here with the GPU server)
    test_abort_rpc_and_finish_reasons,
    test_bad_input_is_invalid_argument_and_others_keep_running,
    test_cancel_frees_blocks,
    test_concurrent_greedy_equals_sequential,
    test_generate_cli,
    test_metrics_endpoint,
    test_model_and_server_info,
    test_seeded_burst_completes_once_and_reproduces,
    test_unavailable_while_starting_then_serving,
)
from tests.server_harness import ServerProcess, start_server

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = start_server(
        tmp_path_factory.mktemp("gpu-server"),
        "--num-gpus",
        "1",
        "--dtype",
        "float32",
        "--gpu-memory-utilization",
        "0.3",
    )
    yield proc
    proc.stop()
