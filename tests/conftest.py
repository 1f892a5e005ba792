from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

from tests.server_harness import ServerProcess, start_server

if not torch.cuda.is_available():
    # Triton kernels run in the interpreter on CPU; set before any test module imports triton.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """``gpu`` tests skip without CUDA, whatever ``-m`` expression selected them."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def cpu_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One real ``kunserve serve`` (2 CPU workers, stories260K, float32)."""
    proc = start_server(tmp_path_factory.mktemp("server"))
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def gpu_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One real ``kunserve serve`` with one GPU worker (stories260K, float32)."""
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


@pytest.fixture
def server(request: pytest.FixtureRequest) -> ServerProcess:
    """The GPU server for tests marked ``gpu``, else the CPU one."""
    name = "gpu_server" if request.node.get_closest_marker("gpu") else "cpu_server"
    return request.getfixturevalue(name)
