"""KunserveClient / AsyncKunserveClient / `kunserve generate` against the fake server."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable

import pytest

from client.api_types import Delta, Finished, KunserveError
from client.cli import generate_main
from client.grpc_client import AsyncKunserveClient, KunserveClient, build_generate_request
from tests.client.fake_server import FakeServer, FakeState


def _wait_for(predicate: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_build_request_maps_prompt_kinds_and_sampling() -> None:
    text = build_generate_request("hi there", temperature=0, stop="\n", ignore_eos=True)
    assert text.WhichOneof("input") == "text"
    assert text.sampling_params.temperature == 0.0
    assert text.sampling_params.HasField("temperature")
    assert list(text.sampling_params.stop) == ["\n"]
    assert text.sampling_params.ignore_eos is True
    ids = build_generate_request([1, 5, 9], max_tokens=3, stop_token_ids=[2, 7])
    assert list(ids.token_ids.ids) == [1, 5, 9]
    assert list(ids.sampling_params.stop_token_ids) == [2, 7]
    chat = build_generate_request([{"role": "user", "content": "hello"}])
    assert chat.WhichOneof("input") == "messages"
    assert chat.messages.messages[0].role == "user"
    assert chat.messages.add_generation_prompt is True
    assert not chat.sampling_params.HasField("max_tokens")


def test_build_request_rejects_unknown_sampling_and_bad_prompt() -> None:
    with pytest.raises(TypeError, match="max_new_tokens"):
        build_generate_request("x", max_new_tokens=3)
    with pytest.raises(TypeError, match="prompt must be"):
        build_generate_request([1.5, 2.5])


def test_sync_stream_deltas_then_finished(fake_server: FakeServer) -> None:
    with KunserveClient(fake_server.host, fake_server.port) as c:
        events = list(c.generate("once upon a time", request_id="r1", max_tokens=3))
    assert [e.token_ids for e in events[:-1]] == [(3,), (4,), (5,)]
    assert "".join(e.text for e in events if isinstance(e, Delta)) == "t0 t1 t2 "
    fin = events[-1]
    assert isinstance(fin, Finished)
    assert (fin.reason, fin.usage.prompt_tokens, fin.usage.completion_tokens) == ("length", 4, 3)
    assert fin.request_id == "r1" and fin.timing.instance_id == 0


def test_sync_invalid_argument_names_the_field(fake_server: FakeServer) -> None:
    with KunserveClient(fake_server.host, fake_server.port) as c:
        with pytest.raises(KunserveError) as info:
            list(c.generate("hello", max_tokens=0))
        assert info.value.code_name == "INVALID_ARGUMENT"
        assert "sampling_params.max_tokens" in info.value.message
        with pytest.raises(KunserveError) as info:
            list(c.generate("busy"))
        assert info.value.code_name == "RESOURCE_EXHAUSTED" and info.value.retryable


def test_sync_mid_stream_error_after_first_delta(fake_server: FakeServer) -> None:
    with KunserveClient(fake_server.host, fake_server.port) as c:
        stream = c.generate("boom", max_tokens=5)
        assert isinstance(next(stream), Delta)
        with pytest.raises(KunserveError) as info:
            next(stream)
    assert info.value.code_name == "INTERNAL"
    assert info.value.message == "engine fault on this request"


def test_sync_cancel_reaches_server(fake_server: FakeServer) -> None:
    fake_server.state.token_delay_s = 0.02
    with KunserveClient(fake_server.host, fake_server.port) as c:
        stream = c.generate("long story", request_id="c1", max_tokens=200)
        assert isinstance(next(stream), Delta)
        stream.cancel()
        with pytest.raises(KunserveError) as info:
            for _ in stream:
                pass
        assert info.value.code_name == "CANCELLED"
    _wait_for(lambda: "c1" in fake_server.state.cancelled)
    assert "c1" not in fake_server.state.completed


def test_sync_model_and_server_info(fake_server: FakeServer) -> None:
    with KunserveClient(fake_server.host, fake_server.port) as c:
        c.wait_ready(timeout=5)
        info = c.model_info()
        server = c.server_info()
    assert (info.served_model_name, info.max_model_len, info.eos_token_ids) == (
        "stories260K",
        512,
        (2,),
    )
    assert info.tokenizer_json.lstrip().startswith("{")
    assert [i.instance_id for i in server.instances] == [0, 1]
    assert server.instances[0].state == "normal" and server.instances[0].kv_usage == 0.0


def test_wait_ready_waits_for_readiness() -> None:
    server = FakeServer(FakeState(ready_after_s=0.3)).start()
    try:
        with KunserveClient(server.host, server.port) as c:
            t0 = time.monotonic()
            c.wait_ready(timeout=5)
            assert time.monotonic() - t0 >= 0.25
    finally:
        server.stop()


def test_wait_ready_times_out_without_server() -> None:
    with KunserveClient("127.0.0.1", _free_port()) as c, pytest.raises(KunserveError) as info:
        c.wait_ready(timeout=0.3)
    assert info.value.code_name == "DEADLINE_EXCEEDED"


def test_async_stream_chat_and_token_ids(fake_server: FakeServer) -> None:
    async def main() -> tuple[list, list]:
        async with AsyncKunserveClient(fake_server.host, fake_server.port) as c:
            await c.wait_ready(timeout=5)
            chat = [e async for e in c.generate([{"role": "user", "content": "a b"}], max_tokens=2)]
            ids = [e async for e in c.generate([1, 2, 3], max_tokens=1, detokenize=False)]
            return chat, ids

    chat, ids = asyncio.run(main())
    assert [type(e) for e in chat] == [Delta, Delta, Finished]
    assert chat[-1].usage.prompt_tokens == 2
    assert ids[0] == Delta(token_ids=(3,), text="", request_id=ids[0].request_id)
    kinds = [r.WhichOneof("input") for r in fake_server.state.requests]
    assert kinds == ["messages", "token_ids"]


def test_async_task_cancel_and_abort_reach_server(fake_server: FakeServer) -> None:
    async def main() -> Finished:
        async with AsyncKunserveClient(fake_server.host, fake_server.port) as c:

            async def consume(rid: str) -> list:
                return [e async for e in c.generate("hang", request_id=rid, max_tokens=3)]

            cancelled = asyncio.create_task(consume("a1"))
            aborted = asyncio.create_task(consume("a2"))
            while not {"a1", "a2"} <= set(fake_server.state.live):
                await asyncio.sleep(0.01)
            cancelled.cancel()
            assert await c.abort(["a2", "unknown"]) == ["a2"]
            with pytest.raises(asyncio.CancelledError):
                await cancelled
            return (await aborted)[-1]

    fin = asyncio.run(main())
    assert fin.reason == "abort"
    _wait_for(lambda: "a1" in fake_server.state.cancelled)
    assert fake_server.state.aborted == {"a2"}


def test_async_error_mapping(fake_server: FakeServer) -> None:
    async def main() -> KunserveError:
        async with AsyncKunserveClient(fake_server.host, fake_server.port) as c:
            try:
                async for _ in c.generate("x", top_p=1.5):
                    pass
            except KunserveError as err:
                return err
        raise AssertionError("no error raised")

    err = asyncio.run(main())
    assert err.code_name == "INVALID_ARGUMENT" and "sampling_params.top_p" in err.message


def test_generate_cli_streams_text(
    fake_server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--host", fake_server.host, "--port", str(fake_server.port), "--max-tokens", "2"]
    assert generate_main([*argv, "--chat", "tell me a story"]) == 0
    assert capsys.readouterr().out == "t0 t1 \n"
    assert fake_server.state.requests[-1].WhichOneof("input") == "messages"


def test_generate_cli_reports_server_error(
    fake_server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--host", fake_server.host, "--port", str(fake_server.port), "--max-tokens", "0"]
    assert generate_main([*argv, "hello"]) == 1
    err = capsys.readouterr().err
    assert "INVALID_ARGUMENT" in err and "sampling_params.max_tokens" in err
