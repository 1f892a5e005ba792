"""`kunserve bench drop`'s own logic, without a server (the end-to-end run is in
tests/coordinator/test_drop_e2e.py)."""

from __future__ import annotations

import argparse

from client.api_types import Finished
from client.transition_bench import _finished_early, _Trace


def test_a_request_ended_before_the_drop_is_named_with_why() -> None:
    """The bench cannot measure when a request ends before the drop. At --max-tokens it asks
    for more; ended short of it (by the server: its KV cache or max model length), it says
    so instead of advising more tokens, which would not help."""
    args = argparse.Namespace(max_tokens=6000, num_requests=16, prompt_len=1024)
    at_limit = _Trace(times=[0.0] * 6000, finished=Finished("length"))
    assert _finished_early(3, at_limit, args) == (
        "request bench-drop-3 ended before the drop (reason 'length', 6000 tokens): "
        "raise --max-tokens"
    )
    short = _finished_early(5, _Trace(times=[0.0], finished=Finished("length")), args)
    assert short.startswith("request bench-drop-5 ended before the drop (reason 'length', 1 ")
    assert "short of --max-tokens 6000" in short and "16 requests of 1024 + 6000" in short
    assert "no final event" in _finished_early(0, _Trace(), args)
