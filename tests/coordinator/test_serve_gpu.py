"""The end-to-end suite against a server whose worker runs on a GPU (float32, stories260K).

The tests are test_serve_e2e's; the ``gpu`` marker makes the ``server`` fixture (conftest.py)
start a GPU worker instead of two CPU workers.
"""

from __future__ import annotations

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

pytestmark = pytest.mark.gpu
