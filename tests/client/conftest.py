"""Fixtures for client tests: an in-process fake server and the stories260K tokenizer."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.client.fake_server import TOKENIZER_PATH, FakeServer, FakeState


@pytest.fixture
def fake_server() -> Iterator[FakeServer]:
    """A started FakeServer (max_model_len 512, no token delay); stopped after the test."""
    server = FakeServer(FakeState()).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def stories_tokenizer_path() -> Path:
    """tests/fixtures/stories260K/tokenizer.json (512-token vocabulary, BOS = 1)."""
    assert TOKENIZER_PATH.is_file(), f"missing test fixture {TOKENIZER_PATH}"
    return TOKENIZER_PATH
