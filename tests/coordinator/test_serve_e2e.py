"""End to end against a real ``kunserve serve`` process (2 CPU workers, stories260K)."""

from __future__ import annotations

import asyncio
import gzip
import itertools
import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from proto.kunserve.v1 import inference_pb2 as pb
from proto.kunserve.v1 import inference_pb2_grpc as pb_grpc
from tests.server_harness import ServerProcess

PROMPTS = (
    Path(__file__).parents[2]
    / "client"
    / "data"
    / "prompts"
    / "sharegpt_v3_first_turn3000.jsonl.gz"
)


def real_prompts(n: int, max_chars: int = 160) -> list[str]:
    """The first ``n`` ShareGPT first-turn prompts, cut to fit stories260K's 512-token context."""
    with gzip.open(PROMPTS, "rt") as f:
        return [json.loads(line)["prompt"][:max_chars] for line in itertools.islice(f, n)]


async def generate(stub: pb_grpc.InferenceServiceStub, text: str, **sampling) -> dict:
    tokens, text_out, finished = [], "", None
    req = pb.GenerateRequest(text=text, sampling_params=pb.SamplingParams(**sampling))
    async for resp in stub.Generate(req):
        if resp.HasField("delta"):
            tokens += resp.delta.token_ids
            text_out += resp.delta.text
        else:
            finished = resp.finished
    return {"tokens": tokens, "text": text_out, "finished": finished}


def run(coro):
    return asyncio.run(coro)


async def _with_stub(server: ServerProcess, fn):
    async with grpc.aio.insecure_channel(server.address) as ch:
        return await fn(pb_grpc.InferenceServiceStub(ch))


def test_unavailable_while_starting_then_serving(server: ServerProcess) -> None:
    assert server.startup_codes, "the server was never observed while starting"
    assert set(server.startup_codes) == {"UNAVAILABLE"}
    with grpc.insecure_channel(server.address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "kunserve.v1.InferenceService"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service)).status
            assert status == health_pb2.HealthCheckResponse.SERVING


def test_concurrent_greedy_equals_sequential(server: ServerProcess) -> None:
    prompts = real_prompts(32)
    params = {"temperature": 0.0, "max_tokens": 32}

    async def body(stub):
        one_by_one = [await generate(stub, p, **params) for p in prompts]
        together = await asyncio.gather(*[generate(stub, p, **params) for p in prompts])
        return one_by_one, together, await stub.GetServerInfo(pb.GetServerInfoRequest())

    one_by_one, together, info = run(_with_stub(server, body))
    for a, b in zip(one_by_one, together, strict=True):
        assert a["finished"].reason == pb.FINISH_REASON_LENGTH
        assert len(a["tokens"]) == 32
        assert (a["tokens"], a["text"]) == (b["tokens"], b["text"])
    assert len({tuple(r["tokens"]) for r in together}) > 1  # different prompts, different outputs
    instances = {r["finished"].timing.instance_id for r in together}
    assert instances == {i.instance_id for i in info.instances}  # every instance served


def test_cancel_frees_blocks(server: ServerProcess) -> None:
    async def body(stub):
        req = pb.GenerateRequest(
            text="Once upon a time",
            sampling_params=pb.SamplingParams(max_tokens=400, ignore_eos=True),
        )
        call = stub.Generate(req)
        seen = 0
        async for resp in call:
            seen += len(resp.delta.token_ids)
            if seen >= 5:
                break
        mid = await stub.GetServerInfo(pb.GetServerInfoRequest())
        call.cancel()
        for _ in range(100):
            info = await stub.GetServerInfo(pb.GetServerInfoRequest())
            if sum(i.kv_blocks_used for i in info.instances) == 0:
                return mid, info
            await asyncio.sleep(0.05)
        return mid, info

    mid, after = run(_with_stub(server, body))
    assert sum(i.kv_blocks_used for i in mid.instances) > 0
    assert sum(i.kv_blocks_used for i in after.instances) == 0
    assert sum(i.num_running + i.num_waiting for i in after.instances) == 0


BAD_INPUTS = [
    (pb.GenerateRequest(text=""), "text"),
    (pb.GenerateRequest(), "input"),
    (
        pb.GenerateRequest(text="hi", sampling_params=pb.SamplingParams(max_tokens=0)),
        "sampling_params.max_tokens",
    ),
    (
        pb.GenerateRequest(text="hi", sampling_params=pb.SamplingParams(max_tokens=-3)),
        "sampling_params.max_tokens",
    ),
    (
        pb.GenerateRequest(text="hi", sampling_params=pb.SamplingParams(temperature=-0.5)),
        "sampling_params.temperature",
    ),
    (
        pb.GenerateRequest(text="hi", sampling_params=pb.SamplingParams(top_p=0.0)),
        "sampling_params.top_p",
    ),
    (
        pb.GenerateRequest(text="hi", sampling_params=pb.SamplingParams(top_p=1.5)),
        "sampling_params.top_p",
    ),
    (
        pb.GenerateRequest(text="hi", sampling_params=pb.SamplingParams(top_k=-2)),
        "sampling_params.top_k",
    ),
    (
        pb.GenerateRequest(text="hi", sampling_params=pb.SamplingParams(max_tokens=600)),
        "sampling_params.max_tokens",
    ),
    (pb.GenerateRequest(text="hi " * 600), "prompt"),
    (pb.GenerateRequest(text="hi", model="llama-70b"), "model"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 99999])), "token_ids"),
    (
        pb.GenerateRequest(
            messages=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="hi")])
        ),
        "messages",
    ),  # stories260K has no chat template
]


@pytest.mark.parametrize(("request_msg", "field"), BAD_INPUTS, ids=[f for _, f in BAD_INPUTS])
def test_bad_input_is_invalid_argument_and_others_keep_running(
    server: ServerProcess, request_msg: pb.GenerateRequest, field: str
) -> None:
    async def body(stub):
        good = asyncio.create_task(
            generate(stub, "Once upon a time", temperature=0.0, max_tokens=16)
        )
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in stub.Generate(request_msg):
                pass
        return err.value, await good

    err, good = run(_with_stub(server, body))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith(field + ":"), err.details()
    assert len(good["tokens"]) == 16


def test_abort_rpc_and_finish_reasons(server: ServerProcess) -> None:
    async def body(stub):
        req = pb.GenerateRequest(
            request_id="abort-me",
            text="Once upon a time",
            sampling_params=pb.SamplingParams(max_tokens=400, ignore_eos=True),
        )
        call = stub.Generate(req)
        first = await call.read()
        aborted = await stub.Abort(pb.AbortRequest(request_ids=["abort-me", "never-existed"]))
        rest = []
        while (msg := await call.read()) is not grpc.aio.EOF:
            rest.append(msg)
        stop = await generate(
            stub, "Once upon a time", temperature=0.0, max_tokens=60, stop=["Lily"]
        )
        return first, aborted, rest, stop

    first, aborted, rest, stop = run(_with_stub(server, body))
    assert first.HasField("delta")
    assert list(aborted.aborted_request_ids) == ["abort-me"]
    assert rest[-1].finished.reason == pb.FINISH_REASON_ABORT
    assert stop["finished"].reason == pb.FINISH_REASON_STOP
    assert stop["finished"].stop_string == "Lily"
    assert "Lily" not in stop["text"] and stop["text"].endswith("named ")


def test_model_and_server_info(server: ServerProcess) -> None:
    async def body(stub):
        return (
            await stub.GetModelInfo(pb.GetModelInfoRequest()),
            await stub.GetServerInfo(pb.GetServerInfoRequest()),
        )

    model, info = run(_with_stub(server, body))
    assert (model.max_model_len, model.vocab_size, model.num_layers) == (512, 512, 5)
    assert list(model.eos_token_ids) == [2]
    assert '"model"' in model.tokenizer_json
    assert [i.instance_id for i in info.instances] == list(range(len(info.instances)))
    for inst in info.instances:
        assert inst.state == pb.INSTANCE_STATE_NORMAL
        assert list(inst.layer_range) == [0, 5]
        # a float32 block: 5 layers x 2 (K, V) x 16 tokens x 4 heads x 8 dims x 4 bytes
        assert inst.kv_bytes_total == inst.kv_blocks_total * 20480
        if inst.device.startswith("cpu"):
            assert inst.kv_blocks_total == 2**30 // 20480  # --cpu-kv-cache-gb 1


def test_metrics_endpoint(server: ServerProcess) -> None:
    run(_with_stub(server, lambda stub: generate(stub, "Once upon a time", max_tokens=4)))
    body = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics").read().decode()
    for name in (
        "time_to_first_token_seconds_bucket",
        "inter_token_latency_seconds_bucket",
        "request_time_per_output_token_seconds_bucket",
        "e2e_request_latency_seconds",
        "num_requests_running",
        "num_requests_waiting",
        "kv_cache_usage_perc",
        "num_preemptions_total",
        "prompt_tokens_total",
        "generation_tokens_total",
        "request_success_total",
    ):
        assert f"kunserve:{name}" in body, name


def test_generate_cli(server: ServerProcess) -> None:
    host, port = server.address.split(":")
    cmd = [
        sys.executable,
        "-m",
        "coordinator.cli",
        "generate",
        "--host",
        host,
        "--port",
        port,
        "--max-tokens",
        "20",
        "--temperature",
        "0",
        "Once upon a time",
    ]
    ok = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith(", there was a little girl named Lily")
    bad = subprocess.run([*cmd[:-1], "--chat", "hello"], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0
    assert "messages" in bad.stderr and "chat template" in bad.stderr


def test_seeded_burst_completes_once_and_reproduces(server: ServerProcess) -> None:
    """64 seeded random-sampling requests at once: each finishes exactly once, with as many
    tokens as its usage says, and the same seed gives the same tokens when sent again alone."""
    prompts = real_prompts(64, 60)

    async def body(stub):
        burst = await asyncio.gather(
            *[
                generate(stub, p, temperature=0.8, seed=i, max_tokens=8)
                for i, p in enumerate(prompts)
            ]
        )
        again = [
            await generate(stub, prompts[i], temperature=0.8, seed=i, max_tokens=8)
            for i in (0, 7, 63)
        ]
        return burst, again

    burst, again = run(_with_stub(server, body))
    assert len(burst) == 64
    for o in burst:
        assert o["finished"] is not None
        assert len(o["tokens"]) == o["finished"].usage.completion_tokens
    assert [a["tokens"] for a in again] == [burst[i]["tokens"] for i in (0, 7, 63)]
