"""Hosted APIs: Anthropic's Messages API and OpenAI's through one sidecar, over TLS too.

A fake provider (fake_anthropic.py) speaks both wire formats; clients are raw HTTP and the
official ``anthropic`` and ``openai`` SDKs; counts are read back from a real Redis.
"""

from __future__ import annotations

import json
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
import redis
from prometheus_client import generate_latest

from sidecar.policy.identity import key_digest
from sidecar.server import Sidecar
from tests.sidecar.conftest import StartSidecar, read_records, scope, totals
from tests.sidecar.fake_anthropic import FakeAnthropic
from tests.sidecar.policy.test_policy_proxy import settled, used, write_policy
from token_scaler.redis_conn import free_port

MESSAGES = [{"role": "user", "content": "Say something long about tokens."}]
VERSION = {"anthropic-version": "2023-06-01"}


@pytest.fixture
async def upstream() -> AsyncIterator[FakeAnthropic]:
    fake = FakeAnthropic()
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


def claude(sidecar: Sidecar, key: str = "sk-ant-test", tenant: str | None = None) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(
        base_url=f"http://127.0.0.1:{sidecar.port}",
        api_key=key,
        max_retries=0,
        default_headers={"X-Tenant-ID": tenant} if tenant else None,
    )


def gpt(sidecar: Sidecar, key: str = "sk-test", tenant: str | None = None) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{sidecar.port}/v1",
        api_key=key,
        max_retries=0,
        default_headers={"X-Tenant-ID": tenant} if tenant else None,
    )


async def post(
    url: str, body: dict[str, Any], headers: dict[str, str], ssl_context: ssl.SSLContext | None = None
) -> tuple[int, bytes]:
    connector = aiohttp.TCPConnector(ssl=ssl_context) if ssl_context else None
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.post(url, json=body, headers=headers) as response,
    ):
        return response.status, await response.read()


async def flush(sidecar: Sidecar) -> None:
    sidecar.flusher.tick()
    assert await sidecar.flusher.deliver()


Policed = Callable[..., Awaitable[Sidecar]]


@pytest.fixture
def policed(start_sidecar: StartSidecar, policy_file: Path, workload: str) -> Policed:
    """Starts a sidecar under a policy (the test's scope, each request reserving on its own)."""

    async def start(doc: dict[str, Any], **settings: Any) -> Sidecar:
        write_policy(policy_file, {"scope": scope(workload), "reservationChunks": {"seconds": 0}, **doc})
        return await start_sidecar(policy=policy_file, model_metrics_url="off", **settings)

    return start


VARIANTS: list[dict[str, str]] = [
    {},
    {"X-Fake-Cache-Read": "400", "X-Fake-Cache-Write": "100"},
    {"X-Fake-Tool": "1"},
    {"X-Fake-Input-Repeat": "1", "X-Fake-Cache-Read": "9"},
]


@pytest.mark.parametrize("stream", [True, False])
async def test_the_client_gets_the_upstream_bytes_and_records_count_exactly(
    start_sidecar: StartSidecar, upstream: FakeAnthropic, redis_url: str, workload: str, stream: bool
) -> None:
    sidecar = await start_sidecar(model_metrics_url="off")
    body = {"model": "claude-x", "max_tokens": 12, "stream": stream, "messages": MESSAGES}
    through: list[bytes] = []
    for variant in VARIANTS:
        status, got = await post(
            f"http://127.0.0.1:{sidecar.port}/v1/messages", body, {"x-api-key": "k", **VERSION, **variant}
        )
        assert status == 200
        through.append(got)
    counted = replace(upstream.anthropic)
    for variant, got in zip(VARIANTS, through, strict=True):
        status, direct = await post(
            f"http://127.0.0.1:{upstream.port}/v1/messages", body, {"x-api-key": "k", **VERSION, **variant}
        )
        assert got == direct  # byte for byte
    if stream:
        assert through[0].startswith(b"event: message_start\ndata: ")
        assert b'event: ping\ndata: {"type": "ping"}\n\n' in through[0]
        assert through[0].endswith(b'event: message_stop\ndata: {"type":"message_stop"}\n\n')
    await flush(sidecar)
    got_totals = totals(read_records(redis_url, workload))
    assert (got_totals["sp"], got_totals["sg"], got_totals["rq"]) == (counted.prompt, counted.generation, 4)
    assert counted.generation == 4 * 12 and counted.prompt > 400 + 100 + 9


async def test_anthropic_and_openai_sdks_through_one_sidecar(
    start_sidecar: StartSidecar, upstream: FakeAnthropic, redis_url: str, workload: str
) -> None:
    sidecar = await start_sidecar(model_metrics_url="off")
    async with claude(sidecar) as client:
        message = await client.messages.create(
            model="claude-x",
            max_tokens=9,
            messages=MESSAGES,
            extra_headers={"X-Fake-Cache-Read": "30"},
        )
        assert message.usage.output_tokens == 9 and message.usage.cache_read_input_tokens == 30
        async with client.messages.stream(
            model="claude-x",
            max_tokens=7,
            messages=MESSAGES,
        ) as stream:
            text = "".join([piece async for piece in stream.text_stream])
            final = await stream.get_final_message()
        assert text == "".join(f"t{j} " for j in range(7)) and final.usage.output_tokens == 7
        before = len(upstream.requests)
        counted = await client.messages.count_tokens(model="claude-x", messages=MESSAGES)
        assert counted.input_tokens > 0 and len(upstream.requests) == before + 1
    async with gpt(sidecar) as client:
        chat = await client.chat.completions.create(model="gpt-x", messages=MESSAGES, max_tokens=5)
        assert chat.usage is not None and chat.usage.completion_tokens == 5
    await flush(sidecar)
    got = totals(read_records(redis_url, workload))
    assert got["rq"] == 3  # count_tokens is not a request for tokens
    assert got["sp"] == upstream.anthropic.prompt + upstream.reported.prompt
    assert got["sg"] == 9 + 7 + 5


async def test_a_broken_stream_counts_the_pieces_that_passed(
    start_sidecar: StartSidecar, upstream: FakeAnthropic, redis_url: str, workload: str
) -> None:
    sidecar = await start_sidecar(model_metrics_url="off")
    body = {"model": "claude-x", "max_tokens": 20, "stream": True, "messages": MESSAGES}
    with pytest.raises(aiohttp.ClientPayloadError):
        await post(
            f"http://127.0.0.1:{sidecar.port}/v1/messages",
            body,
            {"x-api-key": "k", "X-Fake-Fail": "mid", **VERSION},
        )
    await flush(sidecar)
    got = totals(read_records(redis_url, workload))
    # message_start said 1 output token; 10 deltas passed before the upstream broke off
    assert (got["sp"], got["sg"]) == (upstream.anthropic.prompt, 10)


async def test_refusals_are_in_anthropic_shape(policed: Policed, upstream: FakeAnthropic) -> None:
    sidecar = await policed(
        {
            "defaults": {"maxTokens": {"ceiling": 100, "overCeiling": "reject"}},
            "tenants": {"slow": {"rateLimit": {"tokensPerMinute": 150}}},
        },
    )
    url = f"http://127.0.0.1:{sidecar.port}/v1/messages"
    status, body = await post(url, {"model": "claude-x", "messages": MESSAGES}, {"x-api-key": "k", **VERSION})
    assert status == 400
    doc = json.loads(body)
    assert doc["type"] == "error" and doc["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in doc["error"]["message"] and set(doc) == {"type", "error"}
    assert not upstream.requests  # refused before anything was forwarded
    async with claude(sidecar) as client:
        with pytest.raises(anthropic.BadRequestError) as bad:
            await client.messages.create(model="claude-x", max_tokens=500, messages=MESSAGES)
        assert bad.value.body == {
            "type": "error",
            "error": {
                "type": "invalid_request_error",
                "message": "max_tokens 500 is above this tenant's ceiling of 100",
            },
        }
    async with claude(sidecar, tenant="slow") as client:
        await client.messages.create(model="claude-x", max_tokens=100, messages=MESSAGES)
        await settled(sidecar)
        with pytest.raises(anthropic.RateLimitError) as limited:
            await client.messages.create(model="claude-x", max_tokens=100, messages=MESSAGES)
    error = limited.value
    assert isinstance(error.body, dict) and error.body["error"]["type"] == "rate_limit_error"
    assert "Rate limit reached for tenant slow" in error.body["error"]["message"]
    assert int(error.response.headers["retry-after"]) >= 1 and "retry-after-ms" in error.response.headers


async def test_one_token_budget_across_both_wire_formats(
    policed: Policed, upstream: FakeAnthropic, workload: str, redis_url: str
) -> None:
    sidecar = await policed(
        {
            "defaults": {"budget": {"daily": 300}},
        },
    )
    async with gpt(sidecar, tenant="team") as chat, claude(sidecar, tenant="team") as messages:
        await chat.chat.completions.create(model="gpt-x", messages=MESSAGES, max_tokens=100)
        await settled(sidecar)
        await messages.messages.create(model="claude-x", max_tokens=100, messages=MESSAGES)
        await settled(sidecar)
        spent = upstream.reported.prompt + upstream.reported.generation
        spent += upstream.anthropic.prompt + upstream.anthropic.generation
        assert used(redis_url, workload, "team") == spent == 2 * (17 + 100)
        with pytest.raises(anthropic.RateLimitError) as over:
            await messages.messages.create(model="claude-x", max_tokens=100, messages=MESSAGES)
        with pytest.raises(openai.RateLimitError) as also:
            await chat.chat.completions.create(model="gpt-x", messages=MESSAGES, max_tokens=100)
    assert over.value.body == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": "tenant team has used its daily tokens budget"},
    }
    assert also.value.code == "budget_exceeded"
    assert used(redis_url, workload, "team") == spent


async def test_money_budget_prices_cache_tokens_for_both_formats(
    policed: Policed, upstream: FakeAnthropic, workload: str, redis_url: str
) -> None:
    sidecar = await policed(
        {
            "prices": {
                "claude-x": {
                    "per": 1000000,
                    "prompt": 3,
                    "generation": 15,
                    "cacheRead": 0.3,
                    "cacheWrite": 3.75,
                },
                "gpt-x": {"per": 1000000, "prompt": 1.25, "generation": 10, "cacheRead": 0.125},
            },
            "defaults": {"budget": {"unit": "money", "daily": 10}},
        },
    )
    async with claude(sidecar, tenant="team") as client:
        await client.messages.create(
            model="claude-x",
            max_tokens=20,
            messages=MESSAGES,
            extra_headers={"X-Fake-Cache-Read": "400", "X-Fake-Cache-Write": "100"},
        )
    await settled(sidecar)
    fresh = upstream.anthropic.prompt - 500
    # billionths of a dollar: per 1k tokens, 3e6 input, 3e5 cache read, 3.75e6 cache write, 15e6 output
    claude_cost = -(-(fresh * 3_000_000 + 400 * 300_000 + 100 * 3_750_000 + 20 * 15_000_000) // 1000)
    assert used(redis_url, workload, "team") == claude_cost
    async with gpt(sidecar, tenant="team") as chat:
        await chat.chat.completions.create(model="gpt-x", messages=MESSAGES, max_tokens=5)
    await settled(sidecar)
    gpt_cost = -(-(upstream.reported.prompt * 1_250_000 + 5 * 10_000_000) // 1000)
    assert used(redis_url, workload, "team") == claude_cost + gpt_cost


@pytest.mark.parametrize("mode", ["finish", "error"])
async def test_a_stream_past_its_reservation_ends_as_anthropic_ends_one(
    policed: Policed, upstream: FakeAnthropic, workload: str, redis_url: str, mode: str
) -> None:
    sidecar = await policed({"defaults": {"budget": {"daily": 100000, "midStream": mode}}})
    pieces: list[str] = []
    async with (
        claude(sidecar) as client,
        client.messages.stream(
            model="claude-x",
            max_tokens=10,
            messages=MESSAGES,
            extra_headers={"X-Fake-Tokens": "50"},  # a server that ignores max_tokens
        ) as stream,
    ):
        if mode == "finish":
            pieces = [piece async for piece in stream.text_stream]
            final = await stream.get_final_message()
            assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 10
        else:
            with pytest.raises(anthropic.APIStatusError) as ended:
                async for piece in stream.text_stream:
                    pieces.append(piece)
            assert "token budget exhausted" in str(ended.value)
    assert pieces == [f"t{j} " for j in range(10)]
    await settled(sidecar)
    await flush(sidecar)
    assert totals(read_records(redis_url, workload))["sg"] == 10


async def test_the_sidecars_own_errors_are_in_anthropic_shape(start_sidecar: StartSidecar) -> None:
    sidecar = await start_sidecar(
        upstream=f"http://127.0.0.1:{free_port()}", max_body_bytes=400, model_metrics_url="off"
    )
    url = f"http://127.0.0.1:{sidecar.port}/v1/messages"
    big = {"model": "claude-x", "max_tokens": 5, "messages": [{"role": "user", "content": "x" * 500}]}
    for body, status, type_ in (
        (big, 413, "request_too_large"),
        ({"model": "claude-x", "max_tokens": 5, "messages": MESSAGES}, 503, "api_error"),
    ):
        got, answer = await post(url, body, {"x-api-key": "k", **VERSION})
        doc = json.loads(answer)
        assert (got, doc["type"], doc["error"]["type"]) == (status, "error", type_)
    # an OpenAI endpoint of the same sidecar keeps OpenAI's shape
    got, answer = await post(
        f"http://127.0.0.1:{sidecar.port}/v1/chat/completions", {"messages": MESSAGES}, {}
    )
    assert got == 503 and json.loads(answer)["error"]["code"] == "upstream_unavailable"


async def test_ssl_cert_file_names_the_cas_when_no_upstream_ca_is_given(
    start_sidecar: StartSidecar, certs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(certs / "server.crt", certs / "server.key")
    hosted = FakeAnthropic()
    base = await hosted.start(ssl_context=server)
    monkeypatch.setenv("SSL_CERT_FILE", str(certs / "ca.crt"))
    try:
        sidecar = await start_sidecar(upstream=base, model_metrics_url="off")
        async with claude(sidecar) as client:
            message = await client.messages.create(model="claude-x", max_tokens=3, messages=MESSAGES)
        assert message.usage.output_tokens == 3
    finally:
        await hosted.stop()


def _redis_dump(redis_url: str) -> bytes:
    """Every key and value in the test's Redis, as bytes."""
    client = redis.Redis.from_url(redis_url)
    out: list[bytes] = []
    try:
        for key in client.scan_iter(count=1000):
            out.append(key)
            kind = client.type(key)
            value: object = None
            if kind == b"string":
                value = client.get(key)
            elif kind == b"hash":
                value = client.hgetall(key)
            elif kind == b"stream":
                value = client.xrange(key)
            elif kind == b"zset":
                value = client.zrange(key, 0, -1)
            elif kind == b"set":
                value = client.smembers(key)
            out.append(repr(value).encode())
    finally:
        client.close()
    return b"\n".join(out)


async def test_egress_over_tls_keeps_the_provider_keys_secret(
    start_sidecar: StartSidecar,
    policed: Policed,
    workload: str,
    redis_url: str,
    certs: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(certs / "server.crt", certs / "server.key")
    hosted = FakeAnthropic()
    base = await hosted.start(ssl_context=server)
    claude_key, openai_key = "sk-ant-api03-SECRET-claude-key", "sk-proj-SECRET-openai-key"
    policy = {
        "identity": {"apiKeys": {key_digest(claude_key): "team-a", key_digest(openai_key): "team-b"}},
        "defaults": {"budget": {"daily": 100000}, "rateLimit": {"tokensPerMinute": 100000}},
    }
    caplog.set_level(logging.DEBUG)
    try:
        untrusted = await start_sidecar(upstream=base, model_metrics_url="off")
        async with claude(untrusted, claude_key) as client:
            with pytest.raises(anthropic.APIStatusError) as refused:  # verification is on by default
                await client.messages.create(model="claude-x", max_tokens=5, messages=MESSAGES)
        assert refused.value.status_code == 502 and "not trusted" in str(refused.value.body)
        assert not hosted.keys  # nothing reached the untrusted server
        sidecar = await policed(policy, upstream=base, upstream_ca=certs / "ca.crt")
        async with claude(sidecar, claude_key) as client:
            message = await client.messages.create(
                model="claude-x",
                max_tokens=6,
                messages=MESSAGES,
                extra_headers={"anthropic-beta": "fake-beta-1", **VERSION},
            )
            async with client.messages.stream(
                model="claude-x",
                max_tokens=4,
                messages=MESSAGES,
            ) as stream:
                final = await stream.get_final_message()
            with pytest.raises(anthropic.BadRequestError):  # the provider's own error, passed on
                await client.messages.create(
                    model="claude-x",
                    max_tokens=6,
                    messages=MESSAGES,
                    extra_headers={"X-Fake-Fail": "400"},
                )
        # a client that sends Anthropic's x-api-key header: the same tenant
        status, _ = await post(
            f"http://127.0.0.1:{sidecar.port}/v1/messages",
            {"model": "claude-x", "max_tokens": 2, "messages": MESSAGES},
            {"x-api-key": claude_key, **VERSION},
        )
        assert status == 200
        async with gpt(sidecar, openai_key) as chat:
            answer = await chat.chat.completions.create(model="gpt-x", messages=MESSAGES, max_tokens=3)
            streamed = await chat.chat.completions.create(
                model="gpt-x", messages=MESSAGES, max_tokens=2, stream=True
            )
            chunks = [chunk async for chunk in streamed]
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "t0 t1 "
        assert all(chunk.usage is None for chunk in chunks)  # the usage the sidecar asked for is not shown
        assert message.usage.output_tokens == 6 and final.usage.output_tokens == 4
        assert answer.usage is not None and answer.usage.completion_tokens == 3
        # the keys and the provider's headers reached the provider unchanged
        assert hosted.keys == [claude_key] * 4
        sent = [
            {k.lower(): v for k, v in headers.items()} for _method, _path, headers, _body in hosted.requests
        ]
        assert (
            sent[0]["authorization"] == f"Bearer {claude_key}" and sent[0]["anthropic-beta"] == "fake-beta-1"
        )
        assert sent[3]["x-api-key"] == claude_key  # the raw request
        assert sent[0]["anthropic-version"] == "2023-06-01" and sent[0]["host"] == f"127.0.0.1:{hosted.port}"
        assert sent[-1]["authorization"] == f"Bearer {openai_key}"
        await settled(sidecar)
        await flush(sidecar)
        spent_a = used(redis_url, workload, "team-a")
        # the fake counts only what it answered: the 400 cost nothing
        assert spent_a == hosted.anthropic.prompt + hosted.anthropic.generation
        assert used(redis_url, workload, "team-b") == hosted.reported.prompt + 3 + 2
        got = totals(read_records(redis_url, workload))
        assert got["sg"] == 6 + 4 + 2 + 3 + 2
        metrics = generate_latest(sidecar.registry) + generate_latest(untrusted.registry)
        assert b'tenant="team-a"' in metrics
        logged = "\n".join(
            record.getMessage()
            for record in caplog.records
            if not record.name.startswith(("anthropic", "openai", "httpx", "httpcore"))
        )
        assert "request model=claude-x tenant=team-a" in logged  # the sidecar's debug lines were captured
        for key in (claude_key, openai_key):
            for secret in (key, key.encode().hex(), "SECRET"):
                assert secret not in logged
                assert secret.encode() not in metrics
                assert secret.encode() not in _redis_dump(redis_url)
    finally:
        await hosted.stop()


async def test_credentials_in_the_upstream_url_never_reach_the_log(
    start_sidecar: StartSidecar, upstream: FakeAnthropic, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    nothing = free_port()
    sidecar = await start_sidecar(
        upstream=f"http://user:sk-url-SECRET@127.0.0.1:{upstream.port}",
        model_metrics_url=f"http://user:sk-url-SECRET@127.0.0.1:{nothing}/metrics",
    )
    assert sidecar.server_gauges is not None
    async with aiohttp.ClientSession() as session:  # nothing answers there: a warning names it
        assert not await sidecar.server_gauges.poll_once(session)
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert f"http://***@127.0.0.1:{upstream.port}" in logged
    assert f"http://***@127.0.0.1:{nothing}/metrics unreadable" in logged
    assert "sk-url-SECRET" not in logged
