"""The gateway in front of real sidecars: streams unchanged, routing by tokens, replicas leaving."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from tests.gateway.conftest import StartGateway, StartReplica, only
from tests.gateway.test_gateway_hold import client, wait_for

BODIES: list[dict[str, Any]] = [
    {"model": "fake", "prompt": "hello", "max_tokens": 6, "stream": True},
    {
        "model": "fake",
        "prompt": "hello",
        "max_tokens": 6,
        "stream": True,
        "stream_options": {"include_usage": True},
    },
    {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True},
    {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
]


async def test_responses_pass_through_byte_for_byte(
    start_gateway: StartGateway, start_replica: StartReplica
) -> None:
    replica = await start_replica()
    gateway = await start_gateway()
    await wait_for(lambda: only(gateway).router.replicas, what="the replica")
    async with aiohttp.ClientSession() as http:
        for body in BODIES:
            path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
            seen = []
            for base in (replica.url, f"http://127.0.0.1:{gateway.port}"):
                async with http.post(base + path, json=body, headers={"X-Fake-Delay": "0.001"}) as response:
                    seen.append((response.status, response.headers["Content-Type"], await response.read()))
            assert seen[0] == seen[1], body
        async with http.get(f"http://127.0.0.1:{gateway.port}/v1/models") as response:
            assert [m["id"] for m in (await response.json())["data"]] == ["fake"]
        async with http.get(f"http://127.0.0.1:{gateway.port}/metrics") as response:
            assert response.status == 200  # other paths go to a replica as they are
            assert "vllm_requests_total" in await response.text()
    sdk = client(gateway.port)
    chunks = [c async for c in await sdk.chat.completions.create(**{**BODIES[2], "stream": True})]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "t0 t1 t2 t3 "
    await sdk.close()


async def test_long_requests_spread_by_tokens_and_the_cap_holds_the_rest(
    start_gateway: StartGateway, start_replica: StartReplica
) -> None:
    replicas = [await start_replica(capacity_tokens=300) for _ in range(2)]
    gateway = await start_gateway()
    await wait_for(lambda: len(only(gateway).router.replicas) == 2, what="two replicas")
    sdk = client(gateway.port)
    slow = {"X-Fake-Delay": "0.02"}

    async def ask(tokens: int) -> Any:
        stream = await sdk.completions.create(
            model="fake", prompt="p", max_tokens=tokens, stream=True, extra_headers=slow
        )
        return [c async for c in stream]

    # Two long requests (250 tokens each with the prompt): one per replica, each near its cap.
    long = [asyncio.create_task(ask(240)) for _ in range(2)]
    await wait_for(lambda: all(r.upstream.requests for r in replicas), what="one long request each")
    assert sorted(r.local for r in only(gateway).router.replicas.values())[0] > 200
    # A third does not fit anywhere: it waits at the gateway, reported as held demand.
    third = asyncio.create_task(ask(100))
    await wait_for(lambda: len(only(gateway).queue) == 1, what="the third to be held")
    assert only(gateway).demand.held == 1
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{gateway.admin_port}/metrics") as response,
    ):
        text = await response.text()
    assert f'tokenscaler_gateway_queue_requests{{workload="{only(gateway).workload}"}} 1.0' in text
    await asyncio.gather(*long, third)
    assert sum(len(r.upstream.requests) for r in replicas) == 3
    assert only(gateway).demand.held == 0 and len(only(gateway).queue) == 0
    assert all(r.local == 0 and r.requests == 0 for r in only(gateway).router.replicas.values())
    await sdk.close()


async def test_a_replica_leaving_at_sigterm_gets_no_new_request(
    start_gateway: StartGateway, start_replica: StartReplica
) -> None:
    first = await start_replica()
    gateway = await start_gateway()
    await wait_for(lambda: len(only(gateway).router.replicas) == 1, what="the replica")
    await first.sidecar.stop()
    await wait_for(lambda: not only(gateway).router.replicas, within_s=1.0, what="the replica to be dropped")
    second = await start_replica()
    sdk = client(gateway.port)
    answer = await sdk.completions.create(model="fake", prompt="p", max_tokens=3)
    assert answer.usage is not None and answer.usage.completion_tokens == 3
    assert len(second.upstream.requests) == 1 and not first.upstream.requests
    await sdk.close()


async def test_a_refused_connection_goes_to_another_replica(
    start_gateway: StartGateway, start_replica: StartReplica
) -> None:
    replicas = [await start_replica() for _ in range(2)]
    gateway = await start_gateway()
    await wait_for(lambda: len(only(gateway).router.replicas) == 2, what="two replicas")
    # One replica's proxy port closes without withdrawing (as a killed pod whose heartbeat is
    # still fresh): requests routed to it are sent to the other.
    dead = replicas[0]
    assert dead.sidecar.announcer is not None
    dead.sidecar.announcer.left = True  # its heartbeats stop, its entry stays until it ages out
    assert dead.sidecar._proxy_runner is not None
    await dead.sidecar._proxy_runner.cleanup()
    sdk = client(gateway.port)
    answers = await asyncio.gather(
        *(sdk.completions.create(model="fake", prompt="p", max_tokens=2) for _ in range(6))
    )
    assert len(answers) == 6 and len(replicas[1].upstream.requests) == 6
    await sdk.close()
