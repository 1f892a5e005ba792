"""Python clients for kunserve's gRPC API (proto/kunserve/v1/inference.proto).

`KunserveClient` is blocking; `AsyncKunserveClient` uses grpc.aio. Both return the plain
dataclasses of `client.api_types` and raise `KunserveError` for every failed RPC, so callers never
touch protobuf or grpc exceptions.

Example:
    with KunserveClient("127.0.0.1", 50051) as c:
        c.wait_ready(timeout=60)
        for event in c.generate("Once upon a time", max_tokens=32, temperature=0):
            if isinstance(event, Delta):
                print(event.text, end="")
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from client.api_types import (
    Delta,
    Finished,
    KunserveError,
    ModelInfo,
    ServerInfo,
    StreamEvent,
    event_from_proto,
    model_info_from_proto,
    server_info_from_proto,
)
from proto.kunserve.v1 import inference_pb2, inference_pb2_grpc

__all__ = [
    "AsyncGenerateStream",
    "AsyncKunserveClient",
    "Delta",
    "Finished",
    "GenerateStream",
    "KunserveClient",
    "KunserveError",
    "Prompt",
    "StreamEvent",
    "build_generate_request",
]

READINESS_SERVICE = "kunserve.v1.InferenceService"
"""The health service name that is SERVING once every worker is up."""

# tokenizer.json of a large-vocabulary model is ~10 MB: above grpc's 4 MB default.
_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 256 * 1024 * 1024)]
_SAMPLING_FIELDS = frozenset(f.name for f in inference_pb2.SamplingParams.DESCRIPTOR.fields)
_REPEATED_SAMPLING_FIELDS = frozenset(("stop", "stop_token_ids"))

Prompt = str | Sequence[int] | Sequence[dict[str, str]]
"""A text prompt, pre-tokenized ids, or chat messages ({"role": ..., "content": ...})."""


def build_generate_request(
    prompt: Prompt,
    *,
    request_id: str = "",
    model: str = "",
    detokenize: bool = True,
    add_generation_prompt: bool = True,
    **sampling: Any,
) -> inference_pb2.GenerateRequest:
    """Builds a GenerateRequest; `sampling` takes SamplingParams field names.

    Raises:
        TypeError: for an unknown sampling name or a prompt of the wrong type.
    """
    unknown = set(sampling) - _SAMPLING_FIELDS
    if unknown:
        raise TypeError(
            f"unknown sampling parameter(s) {sorted(unknown)}; valid: {sorted(_SAMPLING_FIELDS)}"
        )
    request = inference_pb2.GenerateRequest(
        request_id=request_id, model=model, detokenize=detokenize
    )
    _set_prompt(request, prompt, add_generation_prompt)
    params = request.sampling_params
    params.SetInParent()
    for name, value in sampling.items():
        if value is None:
            continue
        if name in _REPEATED_SAMPLING_FIELDS:
            getattr(params, name).extend([value] if isinstance(value, str | int) else value)
        else:
            setattr(params, name, value)
    return request


def _set_prompt(
    request: inference_pb2.GenerateRequest, prompt: Prompt, add_generation_prompt: bool
) -> None:
    if isinstance(prompt, str):
        request.text = prompt
        return
    items = list(prompt)
    if items and all(isinstance(m, dict) for m in items):
        request.messages.add_generation_prompt = add_generation_prompt
        for m in items:
            request.messages.messages.add(role=m["role"], content=m["content"])
        return
    if all(isinstance(t, int) for t in items):
        request.token_ids.ids.extend(items)
        return
    raise TypeError("prompt must be a str, a list of token ids, or a list of message dicts")


def _to_error(err: grpc.RpcError) -> KunserveError:
    code = err.code() if hasattr(err, "code") else None
    details = err.details() if hasattr(err, "details") else str(err)
    return KunserveError(code.name if code is not None else "UNKNOWN", details or "")


class GenerateStream(Iterator[StreamEvent]):
    """One Generate call's events: zero or more Delta, then one Finished.

    The RPC starts on the first `next()`. `cancel()` (or leaving a `with` block) cancels the
    RPC, which makes the server abort the request and free its KV blocks; iterating after a
    cancel raises KunserveError("CANCELLED").
    """

    def __init__(
        self,
        stub: inference_pb2_grpc.InferenceServiceStub,
        request: inference_pb2.GenerateRequest,
        timeout: float | None,
    ) -> None:
        self._stub = stub
        self._request = request
        self._timeout = timeout
        self._call: Any = None

    def __iter__(self) -> GenerateStream:
        return self

    def __next__(self) -> StreamEvent:
        if self._call is None:
            self._call = self._stub.Generate(self._request, timeout=self._timeout)
        try:
            response = next(self._call)
        except grpc.RpcError as err:
            raise _to_error(err) from None
        return event_from_proto(response)

    def cancel(self) -> None:
        """Cancels the RPC; a no-op before it started or after it ended."""
        if self._call is not None:
            self._call.cancel()

    def __enter__(self) -> GenerateStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()


class KunserveClient:
    """Blocking client for one kunserve server. Safe to share between threads."""

    def __init__(self, host: str = "127.0.0.1", port: int = 50051) -> None:
        self.target = f"{host}:{port}"
        self._channel = grpc.insecure_channel(self.target, options=_CHANNEL_OPTIONS)
        self._stub = inference_pb2_grpc.InferenceServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def generate(
        self,
        prompt: Prompt,
        *,
        request_id: str = "",
        model: str = "",
        detokenize: bool = True,
        add_generation_prompt: bool = True,
        timeout: float | None = None,
        **sampling: Any,
    ) -> GenerateStream:
        """Streams one request's events. `timeout` (seconds) is the RPC deadline.

        Raises:
            TypeError: now, for bad arguments (see `build_generate_request`).
            KunserveError: while iterating, for any RPC error.
        """
        request = build_generate_request(
            prompt,
            request_id=request_id,
            model=model,
            detokenize=detokenize,
            add_generation_prompt=add_generation_prompt,
            **sampling,
        )
        return GenerateStream(self._stub, request, timeout)

    def abort(self, request_ids: Sequence[str], timeout: float = 10.0) -> list[str]:
        """Aborts requests by id; returns the ids that were still live."""
        request = inference_pb2.AbortRequest(request_ids=list(request_ids))
        return list(self._unary(self._stub.Abort, request, timeout).aborted_request_ids)

    def model_info(self, timeout: float = 10.0) -> ModelInfo:
        """GetModelInfo, including the tokenizer.json text."""
        request = inference_pb2.GetModelInfoRequest()
        return model_info_from_proto(self._unary(self._stub.GetModelInfo, request, timeout))

    def server_info(self, timeout: float = 10.0) -> ServerInfo:
        """GetServerInfo: instances, their states and KV-cache usage."""
        request = inference_pb2.GetServerInfoRequest()
        return server_info_from_proto(self._unary(self._stub.GetServerInfo, request, timeout))

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Blocks until grpc.health.v1 reports the inference service SERVING.

        Raises:
            KunserveError: ("DEADLINE_EXCEEDED") if not ready within `timeout` seconds.
        """
        deadline = time.monotonic() + timeout
        request = health_pb2.HealthCheckRequest(service=READINESS_SERVICE)
        last = "no answer"
        while True:
            remaining = deadline - time.monotonic()
            try:
                reply = self._health.Check(request, timeout=max(min(remaining, 2.0), 0.05))
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.RpcError as err:
                last = str(_to_error(err))
            if time.monotonic() + 0.1 >= deadline:
                raise KunserveError(
                    "DEADLINE_EXCEEDED", f"{self.target} not ready after {timeout} s ({last})"
                )
            time.sleep(0.1)

    def close(self) -> None:
        """Closes the channel; live streams are cancelled."""
        self._channel.close()

    def __enter__(self) -> KunserveClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _unary(method: Any, request: Any, timeout: float) -> Any:
        try:
            return method(request, timeout=timeout)
        except grpc.RpcError as err:
            raise _to_error(err) from None


class AsyncGenerateStream:
    """Async counterpart of GenerateStream: `async for event in stream`.

    Cancelling the task that iterates cancels the RPC too. `cancel()` cancels it explicitly;
    iterating afterwards raises KunserveError("CANCELLED").
    """

    def __init__(
        self,
        stub: inference_pb2_grpc.InferenceServiceStub,
        request: inference_pb2.GenerateRequest,
        timeout: float | None,
    ) -> None:
        self._stub = stub
        self._request = request
        self._timeout = timeout
        self._call: Any = None
        self._cancelled = False

    def __aiter__(self) -> AsyncGenerateStream:
        return self

    async def __anext__(self) -> StreamEvent:
        if self._cancelled:
            raise KunserveError("CANCELLED", "cancelled by the client")
        if self._call is None:
            self._call = self._stub.Generate(self._request, timeout=self._timeout)
        try:
            response = await self._call.read()
        except grpc.RpcError as err:
            raise _to_error(err) from None
        except asyncio.CancelledError:
            if self._cancelled:
                raise KunserveError("CANCELLED", "cancelled by the client") from None
            self._call.cancel()
            raise
        if response is grpc.aio.EOF:
            raise StopAsyncIteration
        return event_from_proto(response)

    def cancel(self) -> None:
        """Cancels the RPC; a no-op after it ended."""
        self._cancelled = True
        if self._call is not None:
            self._call.cancel()

    async def __aenter__(self) -> AsyncGenerateStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._call is not None and not self._call.done():
            self.cancel()


class AsyncKunserveClient:
    """grpc.aio client for one kunserve server. Create and use it inside one event loop."""

    def __init__(self, host: str = "127.0.0.1", port: int = 50051) -> None:
        self.target = f"{host}:{port}"
        self._channel = grpc.aio.insecure_channel(self.target, options=_CHANNEL_OPTIONS)
        self._stub = inference_pb2_grpc.InferenceServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def generate(
        self,
        prompt: Prompt,
        *,
        request_id: str = "",
        model: str = "",
        detokenize: bool = True,
        add_generation_prompt: bool = True,
        timeout: float | None = None,
        **sampling: Any,
    ) -> AsyncGenerateStream:
        """Streams one request's events; see KunserveClient.generate."""
        request = build_generate_request(
            prompt,
            request_id=request_id,
            model=model,
            detokenize=detokenize,
            add_generation_prompt=add_generation_prompt,
            **sampling,
        )
        return AsyncGenerateStream(self._stub, request, timeout)

    async def abort(self, request_ids: Sequence[str], timeout: float = 10.0) -> list[str]:
        """Aborts requests by id; returns the ids that were still live."""
        request = inference_pb2.AbortRequest(request_ids=list(request_ids))
        reply = await self._unary(self._stub.Abort, request, timeout)
        return list(reply.aborted_request_ids)

    async def model_info(self, timeout: float = 10.0) -> ModelInfo:
        """GetModelInfo, including the tokenizer.json text."""
        request = inference_pb2.GetModelInfoRequest()
        return model_info_from_proto(await self._unary(self._stub.GetModelInfo, request, timeout))

    async def server_info(self, timeout: float = 10.0) -> ServerInfo:
        """GetServerInfo: instances, their states and KV-cache usage."""
        request = inference_pb2.GetServerInfoRequest()
        reply = await self._unary(self._stub.GetServerInfo, request, timeout)
        return server_info_from_proto(reply)

    async def wait_ready(self, timeout: float = 60.0) -> None:
        """Waits until grpc.health.v1 reports the inference service SERVING.

        Raises:
            KunserveError: ("DEADLINE_EXCEEDED") if not ready within `timeout` seconds.
        """
        deadline = time.monotonic() + timeout
        request = health_pb2.HealthCheckRequest(service=READINESS_SERVICE)
        last = "no answer"
        while True:
            remaining = deadline - time.monotonic()
            try:
                reply = await self._health.Check(request, timeout=max(min(remaining, 2.0), 0.05))
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.RpcError as err:
                last = str(_to_error(err))
            if time.monotonic() + 0.1 >= deadline:
                raise KunserveError(
                    "DEADLINE_EXCEEDED", f"{self.target} not ready after {timeout} s ({last})"
                )
            await asyncio.sleep(0.1)

    async def close(self) -> None:
        """Closes the channel; live streams are cancelled."""
        await self._channel.close()

    async def __aenter__(self) -> AsyncKunserveClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @staticmethod
    async def _unary(method: Any, request: Any, timeout: float) -> Any:
        try:
            return await method(request, timeout=timeout)
        except grpc.RpcError as err:
            raise _to_error(err) from None
