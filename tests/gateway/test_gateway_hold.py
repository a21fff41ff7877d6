"""Holding at zero: requests wait, their demand reaches the stream at once, they go out in order."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
import openai
import pytest

from scaler.metadata import parse
from scaler.series import WorkloadSeries
from scaler.window import evaluate
from tests.gateway.conftest import StartGateway, StartReplica, only
from tests.sidecar.conftest import arrivals, totals
from token_scaler.record import GATEWAY, Record, decode, stream_key


def entries(redis_url: str, workload: str) -> list[tuple[Any, Record]]:
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        return [(i, decode(f)) for i, f in client.xrange(stream_key(workload))]
    finally:
        client.close()


def client(port: int, **kwargs: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, **kwargs
    )


async def wait_for(check: Any, within_s: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + within_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def test_held_requests_wake_the_scaler_and_go_out_in_arrival_order(
    start_gateway: StartGateway, start_replica: StartReplica, redis_url: str, workload: str
) -> None:
    gateway = await start_gateway()
    sdk = client(gateway.port)
    calls = []
    for i in range(5):
        calls.append(
            asyncio.create_task(
                sdk.completions.create(model="fake", prompt=f"request {i} " + "x" * 40, max_tokens=10 + i)
            )
        )
        await wait_for(lambda i=i: len(only(gateway).queue) == i + 1, what=f"request {i} held")
    assert only(gateway).demand.held == 5

    # The held demand is in the stream at once, in the last complete second: the scaler's
    # evaluation at this very moment (Redis time) is active.
    await wait_for(lambda: entries(redis_url, workload), what="the gateway's record")
    held_entries = entries(redis_url, workload)
    assert all(r.role == GATEWAY for _, r in held_entries)
    assert 1 <= arrivals([r for _, r in held_entries]) <= 5  # the wake record holds the first, at least
    series = WorkloadSeries()
    for entry_id, record in held_entries:
        series.add(record, entry_id)
    now_ms = only(gateway).writer.redis_ms()
    settings = parse({"tokensPerSecondPerReplica": "100"}, *workload.split("/"))
    assert evaluate(series, settings, now_ms).active
    assert series.live_sidecars(now_ms, 5000) == {}, "a gateway is not a replica"

    replica = await start_replica()
    answers = await asyncio.gather(*calls)
    assert [a.usage.completion_tokens for a in answers] == [10, 11, 12, 13, 14]
    # Forwarded once each, in arrival order.
    prompts = [json.loads(body)["prompt"].split(" x")[0] for _m, _p, _h, body in replica.upstream.requests]
    assert prompts == [f"request {i}" for i in range(5)]
    assert len(only(gateway).queue) == 0 and only(gateway).demand.held == 0
    await sdk.close()

    # Counting: the gateway's entries sum to zero, the sidecar's to the usage; nothing twice.
    await asyncio.sleep(0.5)  # the sidecar's flush (0.2 s) and the gateway's tick
    await only(gateway).writer.close(2)
    await replica.sidecar.flusher.deliver()
    every = entries(redis_url, workload)
    mine = [r for _, r in every if r.role == GATEWAY]
    theirs = [r for _, r in every if r.role != GATEWAY]
    assert totals(mine) == {"sp": 0, "sg": 0, "ap": 0, "ag": 0, "rq": 0}
    assert arrivals(mine) == 0 and arrivals(theirs) == 5  # each arrival counted once, by the sidecar
    reported = replica.upstream.reported
    assert totals(theirs) == {
        "sp": reported.prompt,
        "sg": reported.generation,
        "ap": reported.prompt,
        "ag": reported.generation,
        "rq": 5,
    }
    assert totals([r for _, r in every])["ag"] == reported.generation


async def test_queue_bounds_and_timeout_answer_503_with_retry_after(
    start_gateway: StartGateway, redis_url: str, workload: str
) -> None:
    gateway = await start_gateway(queue_max_requests=2, queue_timeout_s=0.5, retry_after_s=7)
    sdk = client(gateway.port)
    waiting = [
        asyncio.create_task(sdk.completions.create(model="fake", prompt="p", max_tokens=5)) for _ in range(2)
    ]
    await wait_for(lambda: len(only(gateway).queue) == 2, what="two held")
    async with aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{gateway.port}/v1/completions"
        async with http.post(url, json={"model": "fake", "prompt": "p"}) as response:
            assert response.status == 503
            assert response.headers["Retry-After"] == "7"
            body = await response.json()
            assert body["error"]["code"] == "queue_full"
            assert "2 requests" in body["error"]["message"]
    for task in waiting:
        with pytest.raises(openai.InternalServerError) as info:
            await task
        assert info.value.status_code == 503
        assert info.value.response.headers["Retry-After"] == "7"
        assert "could take the request within 0.5s" in info.value.message
    assert (
        only(gateway).demand.held == 0 and len(only(gateway).queue) == 0 and only(gateway).queue.tokens == 0
    )
    await only(gateway).writer.close(2)
    mine = [r for _, r in entries(redis_url, workload)]
    assert mine and totals(mine)["ap"] == 0 and totals(mine)["ag"] == 0
    assert arrivals(mine) == 0  # timed out: taken back as its tokens are
    await sdk.close()


async def test_token_bound_and_bad_input(start_gateway: StartGateway) -> None:
    gateway = await start_gateway(queue_max_tokens=100, max_body_bytes=1000)
    sdk = client(gateway.port)
    with pytest.raises(openai.InternalServerError, match="bound of 100 held tokens"):
        await sdk.completions.create(model="fake", prompt="p", max_tokens=500)
    async with aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{gateway.port}"
        async with http.post(f"{base}/v1/chat/completions", data=b"{not json") as response:
            assert response.status == 400
            assert (await response.json())["error"]["type"] == "invalid_request_error"
        async with http.post(f"{base}/v1/completions", data=b"x" * 2000) as response:
            assert response.status == 413
            assert (await response.json())["error"]["code"] == "too_large"
        async with http.get(f"{base}/health") as response:
            assert response.status == 503
            assert (await response.json())["error"]["code"] == "no_replica"
        async with http.get(f"{base}/v1/models") as response:
            assert (await response.json()) == {"object": "list", "data": []}
    with pytest.raises(openai.BadRequestError):
        await sdk.post("/chat/completions", body=["not", "an", "object"], cast_to=object)
    await sdk.close()


async def test_client_that_leaves_is_taken_out_of_the_queue(
    start_gateway: StartGateway, start_replica: StartReplica
) -> None:
    gateway = await start_gateway()
    sdk = client(gateway.port, timeout=0.3)
    with pytest.raises(openai.APITimeoutError):
        await sdk.completions.create(model="fake", prompt="gone", max_tokens=5)
    await wait_for(lambda: len(only(gateway).queue) == 0, what="the queue to empty")
    assert only(gateway).demand.held == 0
    replica = await start_replica()
    await wait_for(lambda: only(gateway).router.replicas, what="the replica")
    await asyncio.sleep(0.2)
    assert replica.upstream.requests == [], "a request whose client left was forwarded"
    await sdk.close()
