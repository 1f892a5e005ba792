"""A tiny in-process kunserve.v1.InferenceService on grpc.aio, for client tests.

It runs its own event loop in a background thread, so both the blocking and the async client
can talk to it. Behaviour, chosen by the prompt:
- any prompt: `max_tokens` (default 4) deltas of one token each, `token_delay_s` apart, then
  Finished(length) with usage and timing;
- text "hang" (or any prompt with `hang_all`): no deltas until the RPC is cancelled or the
  request is aborted;
- every `fail_every`-th Generate call (when > 0): INTERNAL before any delta;
- text "boom": one delta, then INTERNAL ("engine fault ...");
- text "busy": RESOURCE_EXHAUSTED (admission control);
- empty prompt, max_tokens <= 0, top_p outside (0, 1], or prompt + max_tokens over
  max_model_len: INVALID_ARGUMENT naming the field.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from proto.kunserve.v1 import inference_pb2 as pb
from proto.kunserve.v1 import inference_pb2_grpc as pb_grpc

TOKENIZER_PATH = Path(__file__).resolve().parents[1] / "fixtures" / "stories260K" / "tokenizer.json"
READINESS = "kunserve.v1.InferenceService"


@dataclass
class FakeState:
    """What the fake server was asked and did; read by tests (from any thread)."""

    max_model_len: int = 512
    token_delay_s: float = 0.0
    ready_after_s: float = 0.0
    hang_all: bool = False
    fail_every: int = 0
    max_live: int = 0
    requests: list[pb.GenerateRequest] = field(default_factory=list)
    cancelled: set[str] = field(default_factory=set)
    aborted: set[str] = field(default_factory=set)
    completed: set[str] = field(default_factory=set)
    live: dict[str, asyncio.Event] = field(default_factory=dict)


def _prompt_len(request: pb.GenerateRequest) -> int:
    kind = request.WhichOneof("input")
    if kind == "text":
        return len(request.text.split())
    if kind == "token_ids":
        return len(request.token_ids.ids)
    if kind == "messages":
        return sum(len(m.content.split()) for m in request.messages.messages)
    return 0


class FakeInferenceService(pb_grpc.InferenceServiceServicer):
    """InferenceService with scripted behaviour (see the module docstring)."""

    def __init__(self, state: FakeState) -> None:
        self.state = state
        self._ids = itertools.count()

    async def _validate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> int:
        sp, n_prompt = request.sampling_params, _prompt_len(request)
        max_tokens = sp.max_tokens if sp.HasField("max_tokens") else 4
        problem = None
        if n_prompt == 0:
            problem = "input: the prompt is empty"
        elif max_tokens <= 0:
            problem = f"sampling_params.max_tokens must be > 0, got {max_tokens}"
        elif sp.HasField("top_p") and not 0 < sp.top_p <= 1:
            problem = f"sampling_params.top_p must be in (0, 1], got {sp.top_p:g}"
        elif n_prompt + max_tokens > self.state.max_model_len:
            problem = (
                f"input: prompt ({n_prompt}) + max_tokens ({max_tokens}) exceeds "
                f"max_model_len {self.state.max_model_len}"
            )
        if problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        if request.text == "busy":
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "waiting queue full")
        k = self.state.fail_every
        if k and len(self.state.requests) % k == 0:
            await context.abort(grpc.StatusCode.INTERNAL, "engine fault on this request")
        return max_tokens

    async def Generate(  # noqa: N802 (gRPC method name)
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        self.state.requests.append(request)
        max_tokens = await self._validate(request, context)
        rid = request.request_id or f"fake-{next(self._ids)}"
        abort = self.state.live.setdefault(rid, asyncio.Event())
        self.state.max_live = max(self.state.max_live, len(self.state.live))
        hang = request.text == "hang" or self.state.hang_all
        t0 = time.perf_counter()
        try:
            for i in range(max_tokens):
                delay = None if hang else self.state.token_delay_s
                if await _aborted(abort, delay):
                    self.state.aborted.add(rid)
                    yield _finished(rid, pb.FINISH_REASON_ABORT, request, i, t0)
                    return
                if request.text == "boom" and i == 1:
                    await context.abort(grpc.StatusCode.INTERNAL, "engine fault on this request")
                text = f"t{i} " if request.detokenize or not request.HasField("detokenize") else ""
                yield pb.GenerateResponse(
                    request_id=rid, delta=pb.TokenDelta(token_ids=[3 + i % 500], text=text)
                )
            self.state.completed.add(rid)
            yield _finished(rid, pb.FINISH_REASON_LENGTH, request, max_tokens, t0)
        except asyncio.CancelledError:
            self.state.cancelled.add(rid)
            raise
        finally:
            self.state.live.pop(rid, None)

    async def Abort(  # noqa: N802
        self, request: pb.AbortRequest, context: grpc.aio.ServicerContext
    ) -> pb.AbortResponse:
        live = [rid for rid in request.request_ids if rid in self.state.live]
        for rid in live:
            self.state.live[rid].set()
        return pb.AbortResponse(aborted_request_ids=live)

    async def GetModelInfo(  # noqa: N802
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelInfoResponse:
        return pb.GetModelInfoResponse(
            served_model_name="stories260K",
            model_path="tests/fixtures/stories260K",
            max_model_len=self.state.max_model_len,
            vocab_size=512,
            eos_token_ids=[2],
            kv_block_size=16,
            num_layers=5,
            dtype="float32",
            tokenizer_json=TOKENIZER_PATH.read_text(),
        )

    async def GetServerInfo(  # noqa: N802
        self, request: pb.GetServerInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetServerInfoResponse:
        running = len(self.state.live)
        busy = running > 4
        instances = [
            pb.InstanceInfo(
                instance_id=i,
                state=pb.INSTANCE_STATE_PIPELINED if busy else pb.INSTANCE_STATE_NORMAL,
                worker_ranks=[i],
                num_running=running // 2,
                num_waiting=0,
                kv_blocks_total=64,
                kv_blocks_used=min(64, running * 4),
                device="cpu",
            )
            for i in range(2)
        ]
        return pb.GetServerInfoResponse(version="fake", instances=instances, uptime_s=1.0)


async def _aborted(event: asyncio.Event, delay: float | None) -> bool:
    """Waits `delay` seconds (None: forever); True if `event` was set meanwhile."""
    if event.is_set():
        return True
    try:
        await asyncio.wait_for(event.wait(), timeout=delay)
        return True
    except asyncio.TimeoutError:
        return False


def _finished(
    rid: str, reason: int, request: pb.GenerateRequest, n: int, t0: float
) -> pb.GenerateResponse:
    e2e = time.perf_counter() - t0
    return pb.GenerateResponse(
        request_id=rid,
        finished=pb.Finished(
            reason=reason,
            usage=pb.Usage(prompt_tokens=_prompt_len(request), completion_tokens=n),
            timing=pb.ServerTiming(queue_time_s=0.001, ttft_s=0.002, e2e_s=e2e, instance_id=0),
        ),
    )


class FakeServer:
    """Starts FakeInferenceService plus grpc.health.v1 on 127.0.0.1:<free port>."""

    def __init__(self, state: FakeState | None = None) -> None:
        self.state = state or FakeState()
        self.host = "127.0.0.1"
        self.port = 0
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._started = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None

    def start(self) -> FakeServer:
        """Starts serving; returns when the port is bound."""
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError("fake server did not start")
        return self

    def stop(self) -> None:
        """Stops the server and its thread."""
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _main(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._loop.run_until_complete(self._serve())
        self._loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        server = grpc.aio.server()
        pb_grpc.add_InferenceServiceServicer_to_server(FakeInferenceService(self.state), server)
        health = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        self.port = server.add_insecure_port(f"{self.host}:0")
        await server.start()
        await health.set("", health_pb2.HealthCheckResponse.SERVING)
        await health.set(READINESS, health_pb2.HealthCheckResponse.NOT_SERVING)
        self._started.set()
        await asyncio.sleep(self.state.ready_after_s)
        await health.set(READINESS, health_pb2.HealthCheckResponse.SERVING)
        await self._stop.wait()
        await server.stop(grace=None)
