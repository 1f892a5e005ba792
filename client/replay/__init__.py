"""`kunserve replay`: trace replay and benchmark metrics. See client/README.md."""

from client.replay.config import ReplayConfig
from client.replay.runner import ReplayResult, run_replay, run_replay_async

__all__ = ["ReplayConfig", "ReplayResult", "run_replay", "run_replay_async"]
