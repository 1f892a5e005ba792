"""gRPC frontend: ``kunserve.v1.InferenceService`` plus grpc.health.v1 and reflection.

Errors are reported per request and never take the server down: bad input is
INVALID_ARGUMENT naming the field, admission refusal RESOURCE_EXHAUSTED, not ready UNAVAILABLE,
an engine fault INTERNAL. A client cancel aborts the request, which frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from coordinator.coordinator import Coordinator, OverloadedError, ServerUnavailableError
from coordinator.request_state import Delta, Finished
from coordinator.validation import parse_generate_request
from proto.kunserve.v1 import inference_pb2 as pb
from proto.kunserve.v1 import inference_pb2_grpc as pb_grpc
from workers.request import FinishReason, InvalidRequestError

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["InferenceService"].full_name
VERSION = "0.1.0"

_FINISH = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.ABORT: pb.FINISH_REASON_ABORT,
}


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    def __init__(
        self,
        core: Coordinator,
        model_info: pb.GetModelInfoResponse,
        server_info: Callable[[], Awaitable[pb.GetServerInfoResponse]],
    ) -> None:
        self.core = core
        self.model_info = model_info
        self.server_info = server_info

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        rid = request.request_id or uuid.uuid4().hex
        try:
            parsed = parse_generate_request(request, self.core.tokenizer, self.core.limits)
            state = self.core.submit(rid, parsed)
        except InvalidRequestError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except ServerUnavailableError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        except OverloadedError as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
        try:
            while True:
                for event in _coalesced(await state.queue.get(), state.queue):
                    if isinstance(event, Delta):
                        yield pb.GenerateResponse(request_id=rid, delta=_delta_pb(event))
                        continue
                    if event.error is not None:
                        await context.abort(
                            grpc.StatusCode.INTERNAL, f"engine error: {event.error}"
                        )
                    yield pb.GenerateResponse(request_id=rid, finished=_finished_pb(event))
                    return
        finally:
            # The stream ended before the request did: a client cancel. grpc-aio cancels the
            # handler where it waits, so this is a CancelledError at the queue, or, when it
            # waited writing a response, a GeneratorExit at the ``yield`` once the generator
            # is closed; either way the request must not run on (on 2x H200 a bench's
            # cancelled requests decoded to their max tokens, holding KV and demand).
            if self.core.requests.get(rid) is state:
                self.core.abort([rid])

    async def Abort(self, request: pb.AbortRequest, context) -> pb.AbortResponse:
        return pb.AbortResponse(aborted_request_ids=self.core.abort(list(request.request_ids)))

    async def GetModelInfo(self, request, context) -> pb.GetModelInfoResponse:
        return self.model_info

    async def GetServerInfo(self, request, context) -> pb.GetServerInfoResponse:
        return await self.server_info()


def _coalesced(first: Delta | Finished, queue: asyncio.Queue) -> list[Delta | Finished]:
    """``first`` and every event already queued behind it, consecutive deltas merged into one
    (token ids, text and logprobs in order). A stream that fell behind, because the client
    reads slowly or the event loop is busy, then catches up in one message instead of one per
    token, which is what let it fall behind (vLLM's output collector merges the same way)."""
    events = [first]
    while not queue.empty() and not isinstance(events[-1], Finished):
        nxt = queue.get_nowait()
        last = events[-1]
        if isinstance(nxt, Delta) and isinstance(last, Delta):
            logprobs = None
            if last.logprobs is not None or nxt.logprobs is not None:
                logprobs = [*(last.logprobs or ()), *(nxt.logprobs or ())]
            events[-1] = Delta(last.token_ids + nxt.token_ids, last.text + nxt.text, logprobs)
        else:
            events.append(nxt)
    return events


def _delta_pb(d: Delta) -> pb.TokenDelta:
    msg = pb.TokenDelta(token_ids=d.token_ids, text=d.text)
    for lp in d.logprobs or ():
        if lp is not None:
            msg.logprobs.add(logprob=lp[0], top_token_ids=lp[1], top_logprobs=lp[2])
    return msg


def _finished_pb(f: Finished) -> pb.Finished:
    msg = pb.Finished(
        reason=_FINISH[f.reason],
        usage=pb.Usage(prompt_tokens=f.prompt_tokens, completion_tokens=f.completion_tokens),
        timing=pb.ServerTiming(
            queue_time_s=f.queue_time_s,
            ttft_s=f.ttft_s,
            e2e_s=f.e2e_s,
            num_preemptions=f.num_preemptions,
            instance_id=f.instance_id,
        ),
    )
    if f.stop_string is not None:
        msg.stop_string = f.stop_string
    elif f.stop_token_id is not None:
        msg.stop_token_id = f.stop_token_id
    return msg


async def start_grpc_server(
    servicer: InferenceServicer,
    host: str,
    port: int,
    extra_services: Sequence[tuple[str, Callable[[grpc.aio.Server], None]]] = (),
) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    """Binds and starts the server with health NOT_SERVING; raises RuntimeError if the port is
    taken. ``extra_services``: (full service name, function adding its servicer), e.g. the
    AdminService."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_InferenceServiceServicer_to_server(servicer, server)
    for _, add in extra_services:
        add(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (SERVICE_NAME, *(name for name, _ in extra_services))
    reflection.enable_server_reflection(
        (*names, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    address = f"{host}:{port}"
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as e:
        raise RuntimeError(f"cannot listen on {address}: {e}") from e
    if bound == 0:
        raise RuntimeError(f"cannot listen on {address}")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    return server, health_servicer


async def set_serving(health_servicer: health.aio.HealthServicer, serving: bool) -> None:
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else (health_pb2.HealthCheckResponse.NOT_SERVING)
    )
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, status)
