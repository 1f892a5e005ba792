"""A step's logprobs reach the gRPC delta as one entry per token (regression: the engine
handed one bare tuple and the frontend iterated it as a list)."""

from coordinator.frontend import _delta_pb
from coordinator.request_state import Delta
from workers.block_pool import BlockPool, KVCacheManager
from workers.config import SchedulerConfig
from workers.request import Request, SamplingParams
from workers.scheduler import Scheduler


def test_scheduler_logprobs_become_one_delta_entry_per_token() -> None:
    sched = Scheduler(SchedulerConfig(), KVCacheManager(BlockPool(8), 4), max_model_len=64)
    sched.add(Request("r", [1, 2, 3], SamplingParams(logprobs=2), 4, eos_token_ids=[0]))
    out = sched.schedule()
    [o] = sched.update(out, {"r": 7}, {"r": (-0.5, [7, 9], [-0.5, -1.5])})
    assert o.logprobs == [(-0.5, [7, 9], [-0.5, -1.5])]
    msg = _delta_pb(Delta([7], "x", o.logprobs))
    assert [(lp.logprob, list(lp.top_token_ids)) for lp in msg.logprobs] == [(-0.5, [7, 9])]
