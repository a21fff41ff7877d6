"""The proxy against a real fake model server, with the openai SDK and raw HTTP as clients."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import aiohttp
import openai
import pytest

from sidecar.server import Sidecar
from tests.sidecar.conftest import StartSidecar, arrivals, gauges, read_records, totals
from tests.sidecar.fake_upstream import FakeUpstream
from token_scaler.redis_conn import free_port

MESSAGES = [{"role": "user", "content": "Say something long about tokens."}]


def sdk(sidecar: Sidecar, **kwargs: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{sidecar.port}/v1", api_key="k", max_retries=0, **kwargs
    )


async def flush(sidecar: Sidecar) -> None:
    sidecar.flusher.tick()
    assert await sidecar.flusher.deliver()


def sample(sidecar: Sidecar, name: str, **labels: str) -> float:
    return sidecar.registry.get_sample_value(name, labels) or 0.0


async def raw_post(
    url: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as session, session.post(url, json=body, headers=headers) as response:
        return response.status, await response.read()


async def test_non_streamed_counts_equal_usage(
    start_sidecar: StartSidecar, upstream: FakeUpstream, redis_url: str, workload: str
) -> None:
    sidecar = await start_sidecar()
    async with sdk(sidecar) as client:
        chat = await client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=7, n=2)
        completion = await client.completions.create(model="m", prompt="once upon", max_tokens=3)
        embedding = await client.embeddings.create(model="m", input=["a", "b"])
        response = await client.responses.create(model="m", input="hello", max_output_tokens=4)
    assert chat.usage is not None and chat.usage.completion_tokens == 14
    assert completion.usage is not None and embedding.usage is not None and response.usage is not None
    await flush(sidecar)
    records = read_records(redis_url, workload)
    got = totals(records)
    assert (got["sp"], got["sg"], got["rq"]) == (upstream.reported.prompt, upstream.reported.generation, 4)
    assert arrivals(records) == 4
    assert (got["ap"], got["ag"]) == (got["sp"], got["sg"])
    assert (
        sample(sidecar, "tokenscaler_tokens_total", type="generation", model="m", tenant="none") == 14 + 3 + 4
    )
    assert sample(sidecar, "tokenscaler_requests_total", model="m", tenant="none", code="200") == 4
    assert (
        sample(
            sidecar,
            "tokenscaler_estimated_tokens_total",
            type="prompt",
            model="m",
            tenant="none",
            method="length",
        )
        == 0
    )


@pytest.mark.parametrize("client_asks_usage", [False, True])
@pytest.mark.parametrize(
    ("path", "body", "headers"),
    [
        ("/v1/chat/completions", {"model": "m", "messages": MESSAGES, "max_tokens": 6}, {}),
        ("/v1/chat/completions", {"model": "m", "messages": MESSAGES, "max_tokens": 5, "n": 3}, {}),
        (
            "/v1/chat/completions",
            {"model": "m", "messages": MESSAGES, "max_tokens": 9},
            {"X-Fake-Per-Chunk": "4"},
        ),
        (
            "/v1/chat/completions",
            {"model": "m", "messages": MESSAGES, "max_tokens": 4},
            {"X-Fake-Spaces": "1"},
        ),
        ("/v1/completions", {"model": "m", "prompt": "abc", "max_tokens": 5, "n": 2}, {}),
        ("/v1/responses", {"model": "m", "input": "abc", "max_output_tokens": 5}, {}),
    ],
)
async def test_stream_bytes_identical_with_and_without_sidecar(
    start_sidecar: StartSidecar,
    upstream: FakeUpstream,
    redis_url: str,
    workload: str,
    path: str,
    body: dict[str, Any],
    headers: dict[str, str],
    client_asks_usage: bool,
) -> None:
    body = {**body, "stream": True}
    if client_asks_usage:
        body["stream_options"] = {"include_usage": True}
    sidecar = await start_sidecar()
    status, direct = await raw_post(f"http://127.0.0.1:{upstream.port}{path}", body, headers)
    before = upstream.reported.prompt, upstream.reported.generation
    status_proxied, proxied = await raw_post(f"http://127.0.0.1:{sidecar.port}{path}", body, headers)
    assert status == status_proxied == 200
    assert proxied == direct
    assert b"data: [DONE]" in direct or path == "/v1/responses"
    await flush(sidecar)
    got = totals(read_records(redis_url, workload))
    expected = upstream.reported.prompt - before[0], upstream.reported.generation - before[1]
    assert (got["sp"], got["sg"]) == (got["ap"], got["ag"]) == expected
    assert got["rq"] == 1


async def test_streamed_with_the_sdk(
    start_sidecar: StartSidecar, upstream: FakeUpstream, redis_url: str, workload: str
) -> None:
    sidecar = await start_sidecar()
    async with sdk(sidecar) as client:
        stream = await client.chat.completions.create(
            model="m", messages=MESSAGES, max_tokens=12, stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text == "".join(f"t{i} " for i in range(12))
        stream = await client.chat.completions.create(  # type: ignore[call-overload]
            model="m", messages=MESSAGES, max_tokens=3, stream=True, stream_options={"include_usage": True}
        )
        usage = [c.usage async for c in stream if c.usage is not None]
        assert len(usage) == 1 and usage[0].completion_tokens == 3
    await flush(sidecar)
    got = totals(read_records(redis_url, workload))
    assert (got["sp"], got["sg"], got["rq"]) == (upstream.reported.prompt, 15, 2)
    assert sample(sidecar, "tokenscaler_time_to_first_token_seconds_count", model="m") == 2


async def test_server_without_usage_is_counted_and_marked_estimated(
    start_sidecar: StartSidecar, upstream: FakeUpstream, redis_url: str, workload: str
) -> None:
    sidecar = await start_sidecar()
    headers = {"X-Fake-Usage": "0", "X-Tenant-ID": "acme"}
    async with sdk(sidecar, default_headers=headers) as client:
        stream = await client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=8, stream=True)
        async for _ in stream:
            pass
        await client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=5)
    await flush(sidecar)
    got = totals(read_records(redis_url, workload))
    # 8 pieces streamed; the whole answer "t0 t1 t2 t3 t4 " is 15 characters: 4 by length.
    assert got["sg"] == got["ag"] == 8 + 4
    labels = {"type": "generation", "model": "m", "tenant": "acme"}
    assert sample(sidecar, "tokenscaler_estimated_tokens_total", **labels, method="pieces") == 8
    assert sample(sidecar, "tokenscaler_estimated_tokens_total", **labels, method="length") == 4
    labels["type"] = "prompt"
    assert sample(sidecar, "tokenscaler_estimated_tokens_total", **labels, method="length") > 0


async def test_malformed_stream_passes_through(start_sidecar: StartSidecar, upstream: FakeUpstream) -> None:
    sidecar = await start_sidecar()
    body = {"model": "m", "messages": MESSAGES, "stream": True}
    headers = {"X-Fake-Malformed": "1"}
    _, direct = await raw_post(f"http://127.0.0.1:{upstream.port}/v1/chat/completions", body, headers)
    _, proxied = await raw_post(f"http://127.0.0.1:{sidecar.port}/v1/chat/completions", body, headers)
    assert proxied == direct
    assert sample(sidecar, "tokenscaler_upstream_malformed_responses_total", model="m") == 1
    assert sample(sidecar, "tokenscaler_requests_total", model="m", tenant="none", code="200") == 1


@pytest.mark.parametrize(
    "body", [b"{not json", b"plain text", b'["a list"]', b"", b'{"a":1,"a":2}', b"\xff{}"]
)
async def test_a_body_that_is_not_one_json_object_is_refused_not_forwarded(
    start_sidecar: StartSidecar, upstream: FakeUpstream, body: bytes
) -> None:
    sidecar = await start_sidecar()
    async with aiohttp.ClientSession() as session:
        proxied = await session.post(f"http://127.0.0.1:{sidecar.port}/v1/chat/completions", data=body)
        error = (await proxied.json())["error"]
    assert proxied.status == 400 and error["code"] == "invalid_json" and error["message"]
    assert upstream.requests == []
    assert sample(sidecar, "tokenscaler_rejected_requests_total", code="400") == 1


async def test_body_over_the_limit_gets_413(start_sidecar: StartSidecar, upstream: FakeUpstream) -> None:
    sidecar = await start_sidecar(max_body_bytes=1000)
    async with sdk(sidecar) as client:
        with pytest.raises(openai.APIStatusError) as caught:
            await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "x" * 2000}]
            )
    assert caught.value.status_code == 413
    assert caught.value.body["code"] == "request_too_large"  # type: ignore[index]

    async def chunks() -> Any:
        for _ in range(5):
            yield b"x" * 300

    async with aiohttp.ClientSession() as session:  # chunked: no Content-Length to check up front
        response = await session.post(f"http://127.0.0.1:{sidecar.port}/v1/completions", data=chunks())
        assert response.status == 413
    assert upstream.requests == []


async def test_passthrough_of_other_paths(start_sidecar: StartSidecar, upstream: FakeUpstream) -> None:
    sidecar = await start_sidecar()
    async with aiohttp.ClientSession() as session:
        metrics = await session.get(f"http://127.0.0.1:{sidecar.port}/metrics")
        assert "vllm_requests_total 1" in await metrics.text()
        response = await session.put(
            f"http://127.0.0.1:{sidecar.port}/echo/a%2Fb?x=1&status=201",
            data=b"\x00\x01body",
            headers={"X-Custom": "v", "Connection": "keep-alive, X-Hop", "X-Hop": "gone"},
        )
        echoed = await response.json()
        assert response.status == 201 and response.headers["X-Echo"] == "1"
    assert echoed["method"] == "PUT" and echoed["path"] == "/echo/a%2Fb?x=1&status=201"
    assert echoed["body"] == "\x00\x01body"
    assert echoed["headers"]["X-Custom"] == "v" and "X-Hop" not in echoed["headers"]
    assert sample(sidecar, "tokenscaler_requests_total", model="unknown", tenant="none", code="201") == 0


async def test_upstream_errors_become_openai_errors(
    start_sidecar: StartSidecar, upstream: FakeUpstream
) -> None:
    sidecar = await start_sidecar(read_timeout_s=0.2)
    async with sdk(sidecar) as client:
        with pytest.raises(openai.InternalServerError) as failed:
            await client.chat.completions.create(
                model="m", messages=MESSAGES, extra_headers={"X-Fake-Fail": "500"}
            )
        assert failed.value.status_code == 500 and failed.value.message.endswith("fake failure")
        with pytest.raises(openai.APIStatusError) as caught:
            await client.chat.completions.create(
                model="m", messages=MESSAGES, extra_headers={"X-Fake-First-Delay": "2"}
            )
        assert caught.value.status_code == 504
    down = await start_sidecar(upstream=f"http://127.0.0.1:{free_port()}")
    async with sdk(down) as client:
        with pytest.raises(openai.APIStatusError) as caught:
            await client.chat.completions.create(model="m", messages=MESSAGES)
        assert caught.value.status_code == 503
        assert caught.value.body["type"] == "server_error"  # type: ignore[index]
    # "m" was never answered successfully: not a label (sidecar/labels.py).
    assert sample(sidecar, "tokenscaler_requests_total", model="other", tenant="none", code="500") == 1
    assert sample(sidecar, "tokenscaler_requests_total", model="other", tenant="none", code="504") == 1
    assert sample(down, "tokenscaler_requests_total", model="other", tenant="none", code="503") == 1


async def test_upstream_breaking_mid_stream_breaks_the_client_stream(
    start_sidecar: StartSidecar, upstream: FakeUpstream, redis_url: str, workload: str
) -> None:
    sidecar = await start_sidecar()
    async with sdk(sidecar) as client:
        stream = await client.chat.completions.create(
            model="m", messages=MESSAGES, max_tokens=10, stream=True, extra_headers={"X-Fake-Fail": "mid"}
        )
        with pytest.raises(openai.APIError):
            async for _ in stream:
                pass
    await flush(sidecar)
    records = read_records(redis_url, workload)
    got = totals(records)
    assert got["sg"] == got["ag"] == 5 and got["sp"] == got["ap"] > 0 and got["rq"] == 1
    assert arrivals(records) == 1  # a failed request arrived all the same
    assert sample(sidecar, "tokenscaler_requests_total", model="m", tenant="none", code="502") == 1


async def eventually(condition: Any, timeout_s: float = 5.0) -> None:
    for _ in range(int(timeout_s / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time")


async def test_client_disconnect_cancels_upstream_and_counts_what_was_served(
    start_sidecar: StartSidecar, upstream: FakeUpstream, redis_url: str, workload: str
) -> None:
    sidecar = await start_sidecar()
    body = {"model": "m", "messages": MESSAGES, "max_tokens": 1000, "stream": True}
    async with aiohttp.ClientSession() as session:
        response = await session.post(
            f"http://127.0.0.1:{sidecar.port}/v1/chat/completions",
            json=body,
            headers={"X-Fake-Delay": "0.005"},
        )
        received = 0
        async for line in response.content:
            received += line.startswith(b"data: {") and b'"content":"t' in line
            if received == 5:
                break
        response.close()
    await eventually(lambda: upstream.disconnects == 1)
    await eventually(
        lambda: sample(sidecar, "tokenscaler_requests_total", model="m", tenant="none", code="499") == 1
    )
    await flush(sidecar)
    records = read_records(redis_url, workload)
    got = totals(records)
    assert 5 <= got["sg"] < 1000 and got["sg"] == got["ag"] and got["sp"] == got["ap"] > 0
    assert arrivals(records) == 1  # so did one whose client left
    assert gauges(records[-1].models["m"]) == (0, 0, 0, 0)


async def test_tenants_are_counted_and_bounded(
    start_sidecar: StartSidecar, redis_url: str, workload: str
) -> None:
    sidecar = await start_sidecar(max_tenants=2)
    async with sdk(sidecar) as client:
        for tenant in ["a", "b", "c", "d", "a"]:
            await client.chat.completions.create(
                model="m", messages=MESSAGES, max_tokens=2, extra_headers={"X-Tenant-ID": tenant}
            )
    await flush(sidecar)
    tenants = read_records(redis_url, workload)[-1].tenants
    assert {t: c["m"].generation for t, c in tenants.items()} == {"a": 4, "b": 2, "other": 4}
    assert sample(sidecar, "tokenscaler_tokens_total", type="generation", model="m", tenant="other") == 4


async def test_thousands_of_mixed_requests_count_exactly(
    start_sidecar: StartSidecar, upstream: FakeUpstream, redis_url: str, workload: str
) -> None:
    sidecar = await start_sidecar()
    rng = random.Random(7)
    limit = asyncio.Semaphore(64)

    async def one(client: openai.AsyncOpenAI, session: aiohttp.ClientSession, i: int) -> None:
        model = rng.choice(["llama", "qwen"])
        tenant = rng.choice(["t1", "t2", "t3"])
        kind = rng.choice(["chat", "completions", "embeddings"])
        stream = kind != "embeddings" and rng.random() < 0.5
        body: dict[str, Any] = {"model": model, "max_tokens": rng.randint(1, 40), "n": rng.choice([1, 1, 2])}
        if kind == "chat":
            body["messages"] = [{"role": "user", "content": "x" * i}]
        elif kind == "completions":
            body["prompt"] = "p" * i
        else:
            body = {"model": model, "input": ["e" * i]}
        if stream:
            body["stream"] = True
            if rng.random() < 0.3:
                body["stream_options"] = {"include_usage": True}
        headers = {"X-Tenant-ID": tenant, "X-Fake-Per-Chunk": str(rng.choice([1, 1, 3]))}
        async with limit:
            if i % 4:  # raw HTTP: cheaper than the SDK, so thousands stay fast
                async with session.post(
                    f"http://127.0.0.1:{sidecar.port}/v1/{kind.replace('chat', 'chat/completions')}",
                    json=body,
                    headers=headers,
                ) as response:
                    assert response.status == 200
                    await response.read()
                return
            if kind == "embeddings":
                await client.embeddings.create(model=model, input=body["input"], extra_headers=headers)
                return
            create = client.chat.completions.create if kind == "chat" else client.completions.create
            result = await create(**body, extra_headers=headers)
            if stream:
                async for _ in result:
                    pass

    count = 2000
    async with sdk(sidecar) as client, aiohttp.ClientSession() as session:
        batch = [one(client, session, i) for i in range(count)]
        for start in range(0, count, 500):
            await asyncio.gather(*batch[start : start + 500])
            await flush(sidecar)
    records = read_records(redis_url, workload)
    got = totals(records)
    assert got["rq"] == upstream.reported.requests == count == arrivals(records)
    assert got["sp"] == got["ap"] == upstream.reported.prompt
    assert got["sg"] == got["ag"] == upstream.reported.generation
    prom_g = sum(
        sample(sidecar, "tokenscaler_tokens_total", type="generation", model=m, tenant=t)
        for m in ("llama", "qwen")
        for t in ("t1", "t2", "t3")
    )
    assert prom_g == upstream.reported.generation
    tenant_p = sum(c.prompt for r in records for per in r.tenants.values() for c in per.values())
    assert tenant_p == upstream.reported.prompt
    first = sidecar.flusher.first_seq
    assert [r.seq for r in records] == list(range(first, first + len(records)))
    assert all(gauges(c) == (0, 0, 0, 0) for c in records[-1].models.values())


async def test_slow_heads_and_bodies_are_cut_off(start_sidecar: StartSidecar, upstream: FakeUpstream) -> None:
    sidecar = await start_sidecar(header_timeout_s=0.5, body_timeout_s=0.5)
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # never finished
    await writer.drain()
    async with asyncio.timeout(5):
        assert await reader.read() == b""  # closed by the sidecar
    writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", sidecar.port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
    await writer.drain()
    async with asyncio.timeout(5):
        answer = await reader.read(4096)
    assert answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer
    writer.close()
    assert upstream.requests == []
