"""Drop and restore against a real ``kunserve serve --overload-policy drop`` (2 CPU workers,
stories260K, float32): greedy outputs are token for token those of no transition, nothing is
lost, restarted or duplicated, and KV capacity follows the drop arithmetic exactly."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator

import grpc
import pytest
import torch

from proto.kunserve.v1 import admin_pb2 as apb
from proto.kunserve.v1 import admin_pb2_grpc as apb_grpc
from proto.kunserve.v1 import inference_pb2 as pb
from proto.kunserve.v1 import inference_pb2_grpc as pb_grpc
from tests.coordinator.test_serve_e2e import real_prompts
from tests.server_harness import STORIES, ServerProcess, start_server
from workers.config import ModelConfig

BLOCKS = 256
"""--num-kv-blocks per worker."""
BLOCK_SIZE = 16
PARAMS = {"temperature": 0.0, "max_tokens": 48, "ignore_eos": True}
RANGES = [(0, 3), (3, 5)]


@pytest.fixture(scope="module")
def drop_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """At most 8 running requests and 64 tokens a step per instance, so a transition meets
    waiting requests and chunked prefills. Only admin-forced transitions: the planner's own
    are tested in test_auto_drop_e2e.py."""
    proc = start_server(
        tmp_path_factory.mktemp("drop-server"),
        "--overload-policy",
        "drop",
        "--no-auto-transitions",
        "--num-kv-blocks",
        str(BLOCKS),
        "--max-num-seqs",
        "8",
        "--max-num-batched-tokens",
        "64",
    )
    yield proc
    proc.stop()


def expected_capacity() -> tuple[list[int], int]:
    """Each stage's blocks after the drop, floor((N·full block + freed) / stage block), and the
    group pool (their minimum). Freed: the other stage's layers, plus the LM head and final
    norm on stage 0 and the embedding on stage 1 (the tied head is its own copy)."""
    cfg = ModelConfig.from_dir(STORIES)
    per_token_layer = 2 * cfg.num_kv_heads * cfg.head_dim * 4
    embed = cfg.vocab_size * cfg.hidden_size * 4
    layer = cfg.weight_bytes(torch.float32, 1)
    freed = [2 * layer + embed + cfg.hidden_size * 4, 3 * layer + embed]
    old = BLOCKS * BLOCK_SIZE * per_token_layer * cfg.num_layers
    stages = [
        (old + f) // (BLOCK_SIZE * per_token_layer * (end - start))
        for f, (start, end) in zip(freed, RANGES, strict=True)
    ]
    return stages, min(stages)


async def generate(stub: pb_grpc.InferenceServiceStub, text: str, progress: list[int]) -> dict:
    tokens, finished = [], None
    req = pb.GenerateRequest(text=text, sampling_params=pb.SamplingParams(**PARAMS))
    async for resp in stub.Generate(req):
        if resp.HasField("delta"):
            tokens += resp.delta.token_ids
            progress[0] += len(resp.delta.token_ids)
        else:
            finished = resp.finished
    return {"tokens": tokens, "finished": finished}


async def _after(progress: list[int], tokens: int) -> None:
    while progress[0] < tokens:
        await asyncio.sleep(0.005)


async def burst(address: str, prompts: list[str], actions=()) -> tuple[list[dict], list]:
    """Sends every prompt at once; each action (after_tokens, rpc name, request) runs once the
    burst has streamed that many tokens. Returns the results and, per action, (its response,
    GetServerInfo right after it, tokens streamed when it returned)."""
    async with grpc.aio.insecure_channel(address) as ch:
        stub, admin = pb_grpc.InferenceServiceStub(ch), apb_grpc.AdminServiceStub(ch)
        progress = [0]
        tasks = [asyncio.ensure_future(generate(stub, p, progress)) for p in prompts]
        seen = []
        for after, rpc, request in actions:
            await _after(progress, after)
            resp = await getattr(admin, rpc)(request)
            seen.append((resp, await stub.GetServerInfo(pb.GetServerInfoRequest()), progress[0]))
        return list(await asyncio.gather(*tasks)), seen


def status(address: str, check: bool = True) -> apb.StatusResponse:
    with grpc.insecure_channel(address) as ch:
        req = apb.StatusRequest(check_integrity=check)
        return apb_grpc.AdminServiceStub(ch).Status(req, timeout=60)


def assert_same_outputs(got: list[dict], base: list[dict]) -> None:
    for a, b in zip(got, base, strict=True):
        assert a["tokens"] == b["tokens"]
        assert a["finished"].usage.completion_tokens == len(a["tokens"]) == 48
        assert a["finished"].timing.num_preemptions == 0  # nothing recomputed


def assert_normal(info: pb.GetServerInfoResponse) -> None:
    for inst in info.instances:
        assert inst.state == pb.INSTANCE_STATE_NORMAL
        assert list(inst.worker_ranks) == [inst.instance_id]
        assert list(inst.layer_range) == [0, 5]
        assert (inst.kv_blocks_total, inst.kv_blocks_used) == (BLOCKS, 0)


def assert_pipelined(info: pb.GetServerInfoResponse) -> None:
    stages, pool = expected_capacity()
    for inst, (start, end) in zip(info.instances, RANGES, strict=True):
        assert inst.state == pb.INSTANCE_STATE_PIPELINED
        assert list(inst.worker_ranks) == [0, 1]
        assert list(inst.layer_range) == [start, end]
        assert inst.kv_blocks_total == pool
        assert (
            inst.kv_bytes_total == pool * (end - start) * 4096
        )  # 16 tokens × 4 heads × 8 × 2 × 4 B
    assert info.instances[1].num_running == info.instances[1].num_waiting == 0


def test_drop_and_restore_mid_generation_keep_every_token(drop_server: ServerProcess) -> None:
    prompts = real_prompts(32)
    address = drop_server.address
    status(address)  # block pools checked on both workers
    assert_normal(_info(address))
    base, _ = asyncio.run(burst(address, prompts))
    assert len({tuple(r["tokens"]) for r in base}) > 1

    # (b) drop mid-generation; the group stays pipelined after the burst
    drop = (32 * 6, "Drop", apb.DropRequest(instance_ids=[0, 1]))
    dropped, [(resp, info, streamed)] = asyncio.run(burst(address, prompts, [drop]))
    assert_same_outputs(dropped, base)
    assert streamed < 32 * 48 * 0.75  # it dropped while most tokens were still to come
    stages, pool = expected_capacity()
    assert (list(resp.group.stage_kv_blocks), resp.group.kv_blocks_after) == (stages, pool)
    assert resp.group.kv_blocks_before == 2 * BLOCKS and resp.group.num_requests_moved > 0
    assert_pipelined(info)
    idle = status(address)  # integrity checked on both workers
    assert [g.state for g in idle.groups] == [pb.INSTANCE_STATE_PIPELINED]
    assert [i.kv_blocks_used for i in idle.instances] == [0, 0]
    assert _cli(drop_server, "status", "--json", "--check-integrity")["groups"][0]["group_id"] == 0
    assert "group 0: NORMAL" in _cli_text(drop_server, "restore")
    status(address)  # block pools checked on both workers
    assert_normal(_info(address))
    # that restore gathered nothing (no request ran): both instances serve again on their own
    # (a leader once parked itself at its next step, for a gather it had already skipped)
    again, _ = asyncio.run(asyncio.wait_for(burst(address, prompts), 60))
    assert_same_outputs(again, base)

    # (c) drop, then restore, both mid-generation
    actions = [drop, (32 * 20, "Restore", apb.RestoreRequest())]
    both, [(_, mid, _), (back, after, streamed)] = asyncio.run(burst(address, prompts, actions))
    assert_same_outputs(both, base)
    assert streamed < 32 * 48  # restored before the burst ended
    assert_pipelined(mid)
    assert back.group.state == pb.INSTANCE_STATE_NORMAL
    assert [i.state for i in after.instances] == [pb.INSTANCE_STATE_NORMAL] * 2
    assert [i.kv_blocks_total for i in after.instances] == [BLOCKS, BLOCKS]
    final = status(address)
    assert not final.groups
    assert_normal(_info(address))


def _info(address: str) -> pb.GetServerInfoResponse:
    with grpc.insecure_channel(address) as ch:
        return pb_grpc.InferenceServiceStub(ch).GetServerInfo(pb.GetServerInfoRequest())


def _cli_text(server: ServerProcess, *args: str) -> str:
    host, port = server.address.split(":")
    cmd = [sys.executable, "-m", "coordinator.cli", "admin", *args, "--host", host]
    done = subprocess.run([*cmd, "--port", port], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _cli(server: ServerProcess, *args: str) -> dict:
    return json.loads(_cli_text(server, *args))


def test_admin_errors(drop_server: ServerProcess) -> None:
    with grpc.insecure_channel(drop_server.address) as ch:
        admin = apb_grpc.AdminServiceStub(ch)
        with pytest.raises(grpc.RpcError) as bad:
            admin.Drop(apb.DropRequest(instance_ids=[0, 7]))
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as none:
            admin.Restore(apb.RestoreRequest())
        assert none.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert status(drop_server.address).overload_policy == "drop"


def test_bench_drop_measures_a_forced_drop_and_restore(
    drop_server: ServerProcess, tmp_path
) -> None:
    """``kunserve bench drop`` end to end, twice on one server: requests decode through a drop
    and a restore and each figure comes back from the same run; the second run starts once the
    server has released the first run's cancelled requests (same request ids). A third run,
    whose requests end at their first token, stops before the drop and says why."""
    host, port = drop_server.address.split(":")
    out = tmp_path / "drop.json"
    cmd = [sys.executable, "-m", "coordinator.cli", "bench", "drop", "--host", host]
    cmd += ["--port", port, "--num-requests", "4", "--prompt-len", "32", "--max-tokens", "400"]
    cmd += ["--phase-s", "1", "--weight-gb", "0.001", "--output-json", str(out)]
    cmd += ["--prefill-requests", "3", "--prefill-len", "40"]
    for _ in range(2):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr
    r = json.loads(out.read_text())
    assert r["g"] == 2
    assert (r["kv_blocks_before"], r["kv_blocks_after"]) == (2 * BLOCKS, expected_capacity()[1])
    assert r["capacity_ratio"] == r["kv_blocks_after"] / r["kv_blocks_before"]
    assert 0 < r["drop_s"] < 60 and 0 < r["restore_s"] < 60
    assert r["normal_tokens_per_s"] > 0 and r["pipeline_tokens_per_s"] > 0
    assert r["after_restore_tokens_per_s"] > 0
    assert r["normal_prefill_tokens_per_s"] > 0 and r["pipeline_prefill_tokens_per_s"] > 0
    assert "prompt tokens/s pipelined" in done.stdout
    assert r["max_gap_drop_ms"] > r["normal_tbt_ms"] > 0  # the pause shows as a gap
    assert "drop" in done.stdout and "restore" in done.stdout
    assert [i.state for i in _info(drop_server.address).instances] == [pb.INSTANCE_STATE_NORMAL] * 2
    cmd[cmd.index("--max-tokens") + 1] = "1"  # each request ends before its second token
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    assert done.returncode != 0
    assert "ended before the drop (reason 'length', 1 tokens): raise --max-tokens" in done.stderr
