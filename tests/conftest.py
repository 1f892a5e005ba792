from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run in the interpreter on CPU; set before any test module imports triton.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests.server_harness import ServerProcess, start_server


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One real ``kunserve serve`` (2 CPU workers, stories260K) shared by the e2e tests."""
    proc = start_server(tmp_path_factory.mktemp("server"))
    yield proc
    proc.stop()
