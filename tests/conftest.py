from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.server_harness import ServerProcess, start_server


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One real ``kunserve serve`` (2 CPU workers, stories260K) shared by the e2e tests."""
    proc = start_server(tmp_path_factory.mktemp("server"))
    yield proc
    proc.stop()
