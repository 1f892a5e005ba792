"""Shared helpers for the worker tests: request and pool builders, and the stories260K fixture.

Helpers are served as fixtures (``make_request``, ``make_pool``) so that test modules need no
imports from this file, which pytest loads under the shared module name ``conftest``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from workers.block_pool import BlockPool, KVCacheManager
from workers.request import Request, SamplingParams

_REPO = Path(__file__).resolve().parents[2]
_STORIES_DIRS = (
    _REPO / "tests" / "fixtures" / "stories260K",
    Path("/work/shared/models/stories260K"),
)

EOS = 2
"""stories260K's ``</s>``; the default EOS of ``make_request``."""


def _make_request(
    request_id: str,
    prompt: int | list[int] = 4,
    max_tokens: int = 16,
    eos: frozenset[int] = frozenset({EOS}),
    **sampling: object,
) -> Request:
    """A request whose prompt is ``prompt`` (ids) or ``prompt`` tokens ``[100, 101, ...]``."""
    ids = list(range(100, 100 + prompt)) if isinstance(prompt, int) else list(prompt)
    return Request(
        request_id=request_id,
        prompt_token_ids=ids,
        sampling=SamplingParams(**sampling),
        max_tokens=max_tokens,
        eos_token_ids=eos,
    )


def _make_pool(blocks: int = 11, block_size: int = 4) -> KVCacheManager:
    return KVCacheManager(BlockPool(blocks), block_size)


@pytest.fixture
def make_request() -> Callable[..., Request]:
    """``make_request(id, prompt=4, max_tokens=16, eos={2}, **sampling_params)``."""
    return _make_request


@pytest.fixture
def make_pool() -> Callable[..., KVCacheManager]:
    """``make_pool(blocks=11, block_size=4)``: a KV-cache manager over a fresh pool."""
    return _make_pool


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    """The stories260K checkpoint: the test fixture copy if present, else the shared one."""
    for d in _STORIES_DIRS:
        if (d / "model.safetensors").exists() and (d / "expected_greedy.json").exists():
            return d
    pytest.skip(f"stories260K not found in {[str(d) for d in _STORIES_DIRS]}")


@pytest.fixture(scope="session")
def golden_cases(stories_dir: Path) -> list[dict]:
    """The 6 cases of expected_greedy.json (input_ids, greedy_new_token_ids, ...)."""
    return json.loads((stories_dir / "expected_greedy.json").read_text())["cases"]


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Runs a module's tests with one torch thread, as a CPU worker does (``cpu_threads``).

    The tiny model's ops are far shorter than a thread hand-off, so on a shared 2-core machine
    one thread is about 9x faster than two. The previous setting is restored afterwards.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
