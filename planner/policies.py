"""Overload policies an instance can use when its KV cache runs out (DESIGN.md §4).

Pure Python: imports nothing of kunserve's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

OVERLOAD_POLICIES = ("drop", "recompute", "swap", "migrate")
"""``drop`` is kunserve's (KunServe); the others are the baselines it is measured against."""

IMPLEMENTED_POLICIES = ("recompute", "drop")

T = TypeVar("T")


def check_overload_policy(name: str) -> str:
    """Returns ``name`` or raises ValueError listing the valid and the implemented names."""
    if name not in OVERLOAD_POLICIES:
        raise ValueError(f"overload policy {name!r} is not one of {list(OVERLOAD_POLICIES)}")
    if name not in IMPLEMENTED_POLICIES:
        raise ValueError(
            f"overload policy {name!r} is not implemented yet; available: {list(IMPLEMENTED_POLICIES)}"
        )
    return name


def preemption_victim(running: Sequence[T]) -> int:
    """Index of the request to preempt when KV blocks run out: the most recently admitted.

    vLLM v1's FCFS rule (``self.running.pop()``, reference/kunserve.md §5.1): the newest request
    loses the least work and the oldest keeps its place. Raises ValueError on an empty list.
    """
    if not running:
        raise ValueError("no running request to preempt")
    return len(running) - 1
