"""An upstream that drops a kept-alive connection without answering (llama.cpp's server does,
after a stream, while still advertising keep-alive): the sidecar sends the request again on a
fresh connection instead of answering 502."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import aiohttp
import pytest
from multidict import CIMultiDict

from sidecar.server import Sidecar
from sidecar.upstream import Upstream
from tests.sidecar.conftest import StartSidecar

BODY = json.dumps(
    {
        "id": "cmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }
).encode()


class DroppingServer:
    """Answers the first request of each connection with keep-alive, then closes the
    connection: when the next request arrives on it (``at_next_request``), without a byte of
    answer, or at once after the answer, racing the client's next request."""

    def __init__(self, at_next_request: bool = True) -> None:
        self.at_next_request = at_next_request
        self.connections = 0
        self.answered = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        served = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.decode().split("\r\n"):
                    if line.lower().startswith("content-length:"):
                        length = int(line.split(":", 1)[1])
                await reader.readexactly(length)
                if served:
                    break  # the dead kept-alive connection: close without answering
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: keep-alive\r\n"
                    b"Keep-Alive: timeout=5, max=100\r\nContent-Length: "
                    + str(len(BODY)).encode()
                    + b"\r\n\r\n"
                    + BODY
                )
                await writer.drain()
                served += 1
                self.answered += 1
                if not self.at_next_request:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def through_sidecar(start_sidecar: StartSidecar, upstream: DroppingServer, requests: int) -> Sidecar:
    """Send ``requests`` chats back to back through a sidecar in front of ``upstream``; all
    must be answered."""
    server = await asyncio.start_server(upstream.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        # the upstream counts every request it gets: no polling of its /metrics
        sidecar = await start_sidecar(upstream=f"http://127.0.0.1:{port}", model_metrics_url="off")
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        async with aiohttp.ClientSession() as client:
            for _ in range(requests):
                url = f"http://127.0.0.1:{sidecar.port}/v1/chat/completions"
                async with client.post(url, json=body) as r:
                    assert r.status == 200, await r.text()
                    assert (await r.json())["usage"]["total_tokens"] == 4
        return sidecar
    finally:
        server.close()
        await server.wait_closed()


async def test_a_dropped_kept_alive_connection_is_retried_once(start_sidecar: StartSidecar) -> None:
    upstream = DroppingServer()
    sidecar = await through_sidecar(start_sidecar, upstream, 3)
    assert upstream.answered == 3 and upstream.connections == 3
    assert sidecar.registry.get_sample_value("tokenscaler_upstream_retries_total") == 2


async def test_a_connection_closed_right_after_the_answer_never_fails_a_request(
    start_sidecar: StartSidecar,
) -> None:
    upstream = DroppingServer(at_next_request=False)
    await through_sidecar(start_sidecar, upstream, 50)  # the close races each next request
    assert upstream.answered == 50


class _Session:
    def __init__(self, failures: list[BaseException]) -> None:
        self.failures = failures
        self.calls = 0

    async def request(self, *args: object, **kwargs: object) -> str:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return "answer"


@pytest.mark.parametrize(
    ("failure", "body", "retried"),
    [
        (aiohttp.ServerDisconnectedError(), b"{}", True),
        (aiohttp.ClientOSError(None, "Can not write request body"), b"{}", True),
        (aiohttp.ServerDisconnectedError(), None, True),
        (aiohttp.ServerDisconnectedError(), object(), False),  # a body still streaming in
    ],
)
async def test_which_failures_are_sent_again(failure: BaseException, body: object, retried: bool) -> None:
    session = _Session([failure])
    fake = SimpleNamespace(session=session, retries=Counter())
    if retried:
        answer: object = await Upstream.send(fake, "POST", "http://up/v1/x", CIMultiDict(), body)
        assert answer == "answer"
        assert session.calls == 2 and fake.retries.n == 1
    else:
        with pytest.raises(type(failure)):
            await Upstream.send(fake, "POST", "http://up/v1/x", CIMultiDict(), body)
        assert session.calls == 1


async def test_an_unreachable_server_and_a_second_drop_are_not_retried_again() -> None:
    refused = aiohttp.ClientConnectorError(
        SimpleNamespace(ssl=None, host="up", port=1), OSError(111, "refused")
    )
    for failures, calls in (([refused], 1), ([aiohttp.ServerDisconnectedError()] * 2, 2)):
        session = _Session(list(failures))
        fake = SimpleNamespace(session=session, retries=Counter())
        with pytest.raises(aiohttp.ClientError):
            await Upstream.send(fake, "POST", "http://up/v1/x", CIMultiDict(), b"{}")
        assert session.calls == calls


class Counter:
    def __init__(self) -> None:
        self.n = 0

    def inc(self) -> None:
        self.n += 1
