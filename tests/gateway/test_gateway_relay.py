"""The data path over raw sockets: framing errors, chunked and pipelined requests, clients that
leave mid-stream, and a kept-alive connection the replica closes as a request goes out."""

from __future__ import annotations

import asyncio
import json
import socket
from dataclasses import dataclass, field

import openai
import pytest
import redis

from gateway.server import Gateway
from tests.gateway.conftest import StartGateway, StartReplica, only
from tests.gateway.test_gateway_hold import client, wait_for
from token_scaler.presence import FORGET_MS, HEARTBEAT, Announcement, presence_keys


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


async def read_answer(reader: asyncio.StreamReader) -> Answer:
    """One HTTP/1.1 answer, framed by its own headers (read here independently of the gateway's code)."""
    status_line = await reader.readuntil(b"\r\n")
    headers: dict[str, str] = {}
    while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    status = int(status_line.split()[1])
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            body += await reader.readexactly(size)
            assert await reader.readexactly(2) == b"\r\n"
        while await reader.readuntil(b"\r\n") != b"\r\n":
            pass
    elif "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    else:
        body = await reader.read()
    return Answer(status, headers, body)


async def connect(gateway: Gateway) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", gateway.port)


def post(path: str, doc: object, *extra: str, version: str = "1.1") -> bytes:
    body = json.dumps(doc).encode()
    lines = [f"POST {path} HTTP/{version}", "Host: gw", "Content-Type: application/json", *extra]
    return ("\r\n".join([*lines, f"Content-Length: {len(body)}", "", ""])).encode() + body


def refused(gateway: Gateway, reason: str) -> float:
    value = gateway.registry.get_sample_value(
        "tokenscaler_gateway_refused_requests_total", {"reason": reason}
    )
    return value or 0.0


async def test_framing_errors_get_an_openai_error_and_the_connection_closes(
    start_gateway: StartGateway,
) -> None:
    gateway = await start_gateway(max_body_bytes=1000)
    cases = [
        (b"BREW /pot HTCPCP/1.0\r\n\r\n", 400, "bad_request", "malformed request line"),
        (b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 40_000, 431, "head_too_large", "limit of 32768 bytes"),
        (b"POST /v1/completions HTTP/1.1\r\nContent-Length: 5000\r\n\r\n", 413, "too_large", "limit of 1000"),
        (
            b"POST /v1/completions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"400\r\n" + b"x" * 1024 + b"\r\n0\r\n\r\n",
            413, "too_large", "limit of 1000",
        ),
        (
            b"POST / HTTP/1.1\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n",
            400, "bad_request", "both",
        ),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400, "bad_request", "chunk size"),
    ]  # fmt: skip
    for raw, status, reason, says in cases:
        reader, writer = await connect(gateway)
        writer.write(raw)
        answer = await read_answer(reader)
        assert answer.status == status, raw[:40]
        error = json.loads(answer.body)["error"]
        assert error["code"] == reason and says in error["message"], error
        assert answer.headers["connection"] == "close"
        assert await reader.read() == b"", "the connection stays open after a framing error"
        writer.close()
        assert refused(gateway, reason) >= 1


async def test_chunked_bodies_pipelined_requests_and_http_1_0(
    start_gateway: StartGateway, start_replica: StartReplica
) -> None:
    replica = await start_replica()
    gateway = await start_gateway()
    await wait_for(lambda: only(gateway).router.replicas, what="the replica")
    reader, writer = await connect(gateway)

    # A chunked body, with Expect: 100-continue: the gateway asks for it, reads it whole and
    # forwards it with its length.
    doc = {"model": "fake", "prompt": "chunked", "max_tokens": 2}
    body = json.dumps(doc).encode()
    writer.write(
        b"POST /v1/completions HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n"
        b"Expect: 100-continue\r\n\r\n"
    )
    assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (5, body[:5], len(body) - 5, body[5:]))
    answer = await read_answer(reader)
    assert answer.status == 200 and json.loads(answer.body)["usage"]["completion_tokens"] == 2
    _method, _path, headers, forwarded = replica.upstream.requests[-1]
    assert json.loads(forwarded) == doc and "Transfer-Encoding" not in headers

    # Three requests in one write (one streamed): three answers, in order, on the same connection.
    chat = {"model": "fake", "messages": [{"role": "user", "content": "c"}], "max_tokens": 4}
    writer.write(
        post("/v1/completions", {"model": "fake", "prompt": "a", "max_tokens": 1})
        + post("/v1/completions", {"model": "fake", "prompt": "b", "max_tokens": 3, "stream": True})
        + post("/v1/chat/completions", chat)
    )
    first, second, third = [await read_answer(reader) for _ in range(3)]
    assert json.loads(first.body)["usage"]["completion_tokens"] == 1
    assert second.headers["content-type"].startswith("text/event-stream")
    # an event per token and the finish
    assert second.body.count(b"data: {") == 3 + 1 and second.body.endswith(b"data: [DONE]\n\n")
    assert json.loads(third.body)["usage"]["completion_tokens"] == 4
    assert [json.loads(b)["prompt"] for _m, _p, _h, b in replica.upstream.requests[-3:-1]] == ["a", "b"]

    # Connection: close is honoured after the answer.
    writer.write(
        post("/v1/completions", {"model": "fake", "prompt": "d", "max_tokens": 1}, "Connection: close")
    )
    last = await read_answer(reader)
    assert last.status == 200 and last.headers["connection"] == "close"
    assert await reader.read() == b""
    writer.close()

    # An HTTP/1.0 client gets a stream without the chunked coding, ended by the close.
    reader, writer = await connect(gateway)
    writer.write(
        post(
            "/v1/completions",
            {"model": "fake", "prompt": "e", "max_tokens": 2, "stream": True},
            version="1.0",
        )
    )
    old = await read_answer(reader)
    assert "transfer-encoding" not in old.headers and old.headers["connection"] == "close"
    assert old.body.count(b"data: {") == 2 + 1 and old.body.endswith(b"data: [DONE]\n\n")
    writer.close()
    assert all(r.local == 0 and r.requests == 0 for r in only(gateway).router.replicas.values())


async def test_a_client_leaving_mid_stream_frees_the_replica_and_closes_its_connection(
    start_gateway: StartGateway, start_replica: StartReplica
) -> None:
    replica = await start_replica()
    gateway = await start_gateway()
    await wait_for(lambda: only(gateway).router.replicas, what="the replica")
    reader, writer = await connect(gateway)
    doc = {"model": "fake", "prompt": "long", "max_tokens": 200, "stream": True}
    writer.write(post("/v1/completions", doc, "X-Fake-Delay: 0.02"))
    await reader.readuntil(b"data: {")
    [booked] = only(gateway).router.replicas.values()
    assert booked.requests == 1 and booked.local > 0
    writer.close()
    await wait_for(lambda: booked.requests == 0, what="the request to end at the gateway")
    assert booked.local == 0 and gateway.proxy.outstanding == 0
    assert (
        gateway.registry.get_sample_value(
            "tokenscaler_gateway_requests_total", {"code": "499", "held": "false"}
        )
        == 1
    )
    # The connection to the replica was closed, not kept: the sidecar saw its client go.
    await wait_for(lambda: replica.upstream.disconnects == 1, what="the model server to see the client go")
    assert gateway.proxy.upstreams.idle(replica.url) is None


@dataclass
class ClosingReplica:
    """A stand-in replica that answers the first request on each connection and closes the
    connection, unanswered, when a second one comes on it (as a sidecar closing a connection
    it found idle, at the moment the gateway sends on it)."""

    connections: int = 0
    requests: list[bytes] = field(default_factory=list)
    server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        served = 0
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                break
            length = next(
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            )
            self.requests.append(await reader.readexactly(length))
            if served:
                break
            served += 1
            answer = json.dumps(
                {"object": "text_completion", "choices": [{"index": 0, "text": "ok"}]}
            ).encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                % (len(answer), answer)
            )
        writer.close()

    def stop(self) -> None:
        if self.server is not None:
            self.server.close()


async def test_a_kept_alive_connection_closed_as_a_request_goes_out_is_sent_once_more(
    start_gateway: StartGateway, redis_url: str, workload: str
) -> None:
    stand_in = ClosingReplica()
    url = await stand_in.start()
    announcer = redis.Redis.from_url(redis_url)
    announcer.eval(
        HEARTBEAT, 2, *presence_keys(workload), "stand-in", Announcement(url, ("fake",)).encode(), FORGET_MS
    )
    announcer.close()
    gateway = await start_gateway(replica_liveness_s=120.0)
    await wait_for(lambda: only(gateway).router.replicas, what="the stand-in")
    sdk = client(gateway.port)
    for prompt in ("first", "second"):
        answer = await sdk.completions.create(model="fake", prompt=prompt, max_tokens=1)
        assert answer.choices[0].text == "ok"
    await sdk.close()
    # The second went out on the kept connection, which closed unanswered; it was sent again on
    # a new connection to the same replica, which stays in use.
    assert [json.loads(b)["prompt"] for b in stand_in.requests] == ["first", "second", "second"]
    assert stand_in.connections == 2
    assert gateway.registry.get_sample_value("tokenscaler_gateway_resent_requests_total") == 1
    assert gateway.registry.get_sample_value("tokenscaler_gateway_retries_total") == 0
    [replica] = only(gateway).router.replicas.values()
    assert replica.down_until == 0.0 and replica.requests == 0
    stand_in.stop()


async def test_a_stopping_gateway_finishes_streams_refuses_held_requests_and_new_connections(
    start_gateway: StartGateway, start_replica: StartReplica, workload: str, other: str
) -> None:
    await start_replica()
    gateway = await start_gateway(workload=f"{workload};{other}=zero-model", drain_timeout_s=2.0)
    await wait_for(lambda: gateway.pools.pools[0].router.replicas, what="the replica")
    sdk = client(gateway.port)

    async def stream() -> str:
        events = await sdk.completions.create(
            model="fake", prompt="p", max_tokens=30, stream=True, extra_headers={"X-Fake-Delay": "0.02"}
        )
        return "".join([c.choices[0].text async for c in events if c.choices])

    streaming = asyncio.create_task(stream())
    held = asyncio.create_task(sdk.completions.create(model="zero-model", prompt="p", max_tokens=3))
    await wait_for(lambda: len(gateway.pools.pools[1].queue) == 1, what="the request held at zero")
    await wait_for(lambda: gateway.proxy.outstanding > 0, what="the stream to start")
    stopping = asyncio.create_task(gateway.stop())
    await wait_for(lambda: gateway.listener is not None and gateway.listener.stopping, what="the drain")
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", gateway.port)
    # The stream in flight is answered whole; the held request gets 503 before the drain ends.
    assert await streaming == "".join(f"t{i} " for i in range(30))
    with pytest.raises(openai.InternalServerError) as info:
        await held
    assert info.value.response.headers["Retry-After"] == "1"
    assert "shutting down" in info.value.message
    await stopping
    assert len(gateway.pools.pools[1].queue) == 0 and gateway.proxy.upstreams.open == 0
    await sdk.close()


async def test_a_silent_replica_gets_504_and_one_breaking_off_breaks_the_client_off(
    start_gateway: StartGateway, start_replica: StartReplica
) -> None:
    await start_replica()
    gateway = await start_gateway(read_timeout_s=0.3)
    await wait_for(lambda: only(gateway).router.replicas, what="the replica")
    reader, writer = await connect(gateway)
    writer.write(
        post("/v1/completions", {"model": "fake", "prompt": "p", "max_tokens": 2}, "X-Fake-First-Delay: 1")
    )
    answer = await read_answer(reader)
    error = json.loads(answer.body)["error"]
    assert answer.status == 504 and error["code"] == "replica_error" and "0.3s" in error["message"]
    # The client's connection stays open for its next request; the replica is not left out.
    writer.write(post("/v1/completions", {"model": "fake", "prompt": "p", "max_tokens": 2}))
    assert (await read_answer(reader)).status == 200
    [replica] = only(gateway).router.replicas.values()
    assert replica.down_until == 0.0
    # A stream the replica breaks off after its first events: the client's breaks off too,
    # without the chunked coding's last chunk.
    doc = {"model": "fake", "prompt": "p", "max_tokens": 8, "stream": True}
    writer.write(post("/v1/completions", doc, "X-Fake-Fail: mid"))
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"chunked" in head.lower()
    rest = await reader.read()
    assert b"data: {" in rest and not rest.endswith(b"0\r\n\r\n")
    writer.close()
    await wait_for(lambda: replica.requests == 0, what="the broken request to end")
    assert gateway.registry.get_sample_value("tokenscaler_gateway_broken_streams_total") == 1
    assert replica.local == 0 and gateway.proxy.outstanding == 0


async def test_a_slow_client_pauses_the_replicas_connection_until_it_reads(
    start_gateway: StartGateway, start_replica: StartReplica
) -> None:
    replica = await start_replica()
    gateway = await start_gateway(read_timeout_s=0.5)
    await wait_for(lambda: only(gateway).router.replicas, what="the replica")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", gateway.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    # The kernel's buffers on loopback can hold megabytes: keep the gateway's side small too.
    await wait_for(lambda: gateway.listener is not None and gateway.listener.clients, what="the connection")
    assert gateway.listener is not None
    [accepted] = gateway.listener.clients
    assert accepted.transport is not None
    accepted.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
    # A stream of 20,000 events (about 3 MB): far more than the buffers on its way hold.
    doc = {"model": "fake", "prompt": "p", "max_tokens": 20_000, "stream": True}
    writer.write(post("/v1/completions", doc))
    # Not read yet: the gateway stops reading the replica's connection instead of buffering.
    await wait_for(lambda: any(c.paused for c in gateway.proxy.upstreams._open), what="the pause")
    # Paused past the read timeout: the replica was not silent, the gateway was not reading.
    await asyncio.sleep(1.0)
    answer = await read_answer(reader)
    assert answer.status == 200 and answer.body.count(b"data: {") == 20_000 + 1
    await wait_for(lambda: gateway.proxy.upstreams.idle(replica.url) is not None, what="the connection kept")
    assert not any(c.paused for c in gateway.proxy.upstreams._open)
    writer.close()


async def test_a_connection_idle_past_the_idle_timeout_is_closed(start_gateway: StartGateway) -> None:
    gateway = await start_gateway(idle_timeout_s=0.3)
    reader, writer = await connect(gateway)
    writer.write(b"GET /v1/models HTTP/1.1\r\nHost: gw\r\n\r\n")
    assert (await read_answer(reader)).status == 200
    writer.write(b"GET /v1/models HTTP/1.1\r\n")  # a head that never completes
    assert await reader.read() == b""  # closed by the gateway, not by this side
    writer.close()
