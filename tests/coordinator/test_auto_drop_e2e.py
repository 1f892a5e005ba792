"""Automatic drop and restore against a real ``kunserve serve --overload-policy drop`` (2 CPU
workers, stories260K, float32): a burst that overflows KV memory makes the planner merge the
two instances into a pipeline; once the burst is over it splits them again. Every request
completes, and greedy outputs are token for token those of the same prompts sent one by one
(no overload, no transition)."""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request
from collections.abc import Iterator

import grpc
import pytest

from proto.kunserve.v1 import inference_pb2 as pb
from proto.kunserve.v1 import inference_pb2_grpc as pb_grpc
from tests.coordinator.test_serve_e2e import real_prompts
from tests.server_harness import ServerProcess, start_server

PARAMS = {"temperature": 0.0, "max_tokens": 32, "ignore_eos": True}
NUM_PROMPTS = 16
"""About 7 blocks each: one at a time fits in an instance's 16 blocks; the burst needs ~3.5x."""
PLANNER_FLAGS = {
    "--planner-sample-interval-s": "0.1",
    "--planner-smoothing-s": "0.2",
    "--planner-min-dwell-s": "0.2",
    "--planner-window-s": "1",
    "--planner-cooldown-s": "0.5",
}


@pytest.fixture(scope="module")
def auto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """16 KV blocks per worker (the fewest that hold one 256-token request), fast planner."""
    proc = start_server(
        tmp_path_factory.mktemp("auto-drop-server"),
        "--overload-policy",
        "drop",
        "--num-kv-blocks",
        "16",
        "--max-model-len",
        "256",
        *[x for flag_value in PLANNER_FLAGS.items() for x in flag_value],
    )
    yield proc
    proc.stop()


async def generate(stub: pb_grpc.InferenceServiceStub, text: str) -> dict:
    tokens, finished = [], None
    req = pb.GenerateRequest(text=text, sampling_params=pb.SamplingParams(**PARAMS))
    async for resp in stub.Generate(req):
        if resp.HasField("delta"):
            tokens += resp.delta.token_ids
        else:
            finished = resp.finished
    return {"tokens": tokens, "finished": finished}


async def states(stub: pb_grpc.InferenceServiceStub) -> tuple[str, ...]:
    info = await stub.GetServerInfo(pb.GetServerInfoRequest())
    return tuple(
        pb.InstanceState.Name(i.state).removeprefix("INSTANCE_STATE_") for i in info.instances
    )


async def watch(stub: pb_grpc.InferenceServiceStub, seen: list[tuple[str, ...]]) -> None:
    """Appends the instances' states whenever they change (polls every 50 ms)."""
    while True:
        now = await states(stub)
        if not seen or seen[-1] != now:
            seen.append(now)
        await asyncio.sleep(0.05)


async def run(address: str, prompts: list[str]) -> tuple[list, list, list, float]:
    """One by one, then all at once while watching the states; then waits for NORMAL."""
    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.InferenceServiceStub(ch)
        one_by_one = [await generate(stub, p) for p in prompts]
        assert await states(stub) == ("NORMAL", "NORMAL")  # nothing dropped without a burst
        seen: list[tuple[str, ...]] = []
        watcher = asyncio.ensure_future(watch(stub, seen))
        together = await asyncio.gather(*[generate(stub, p) for p in prompts])
        ended = time.monotonic()
        while seen[-1] != ("NORMAL", "NORMAL") and time.monotonic() - ended < 30:
            await asyncio.sleep(0.05)
        watcher.cancel()
        return one_by_one, together, seen, time.monotonic() - ended


def test_a_burst_drops_automatically_and_restores_after_it(auto_server: ServerProcess) -> None:
    prompts = real_prompts(NUM_PROMPTS)
    one_by_one, together, seen, restore_s = asyncio.run(run(auto_server.address, prompts))
    log = auto_server.log()
    assert ("PIPELINED", "PIPELINED") in seen, (seen, log)
    assert seen[0] == seen[-1] == ("NORMAL", "NORMAL"), (seen, log)
    assert restore_s < 30
    for a, b in zip(one_by_one, together, strict=True):
        assert b["finished"].reason == pb.FINISH_REASON_LENGTH
        assert len(b["tokens"]) == 32
        assert a["tokens"] == b["tokens"]
    for line in ("planner: drop for instance", "planner: restore for group "):
        assert _wait_for_log(auto_server, line), log
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{auto_server.metrics_port}/metrics")
    body = metrics.read().decode()
    for kind in ("drop", "restore"):
        assert _transitions(body, kind, "ok") >= 1, body
        assert _transitions(body, kind, "failed") == 0
    assert re.search(r'kunserve:instance_state\{instance="0",[^}]*state="normal"\} 1\.0', body)


def _transitions(body: str, kind: str, outcome: str) -> float:
    pattern = (
        rf'kunserve:transitions_total\{{kind="{kind}",[^}}]*outcome="{outcome}",'
        rf'trigger="planner"\}} (\S+)'
    )
    return sum(float(v) for v in re.findall(pattern, body))


def _wait_for_log(server: ServerProcess, text: str, timeout_s: float = 10.0) -> bool:
    """Whether ``text`` reaches the server's log (Ray forwards actor logs with a delay)."""
    deadline = time.monotonic() + timeout_s
    while text not in server.log():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True
