"""One gateway, several workloads: each request goes to the workload of its model, each workload
holds and reports its own demand, an unknown model gets a 404 in the shape of its API (OpenAI's,
Anthropic's)."""

from __future__ import annotations

import asyncio

import aiohttp
import anthropic
import openai
import pytest

from gateway.config import GatewayConfig, Route, parse_routes
from tests.gateway.conftest import StartGateway, StartReplica
from tests.gateway.test_gateway_hold import client, entries, wait_for
from tests.sidecar.conftest import arrivals, totals
from token_scaler.errors import ConfigError
from token_scaler.record import GATEWAY


async def test_two_workloads_one_at_zero_while_the_other_serves(
    start_gateway: StartGateway, start_replica: StartReplica, redis_url: str, workload: str, other: str
) -> None:
    alpha = await start_replica(models=("alpha",))
    gateway = await start_gateway(workload=f"{workload}=alpha;{other}=beta")
    pool_a, pool_b = gateway.pools.pools
    await wait_for(lambda: pool_a.router.replicas, what="alpha's replica")
    sdk = client(gateway.port)

    # beta's workload is at zero: its request waits there, and its demand goes to its stream.
    waiting = asyncio.create_task(sdk.completions.create(model="beta", prompt="b", max_tokens=4))
    await wait_for(lambda: len(pool_b.queue) == 1, what="beta's request held")
    assert len(pool_a.queue) == 0 and pool_b.demand.held == 1
    await wait_for(lambda: entries(redis_url, other), what="beta's held demand in its stream")
    assert all(r.role == GATEWAY and set(r.models) == {"beta"} for _, r in entries(redis_url, other))

    # Meanwhile alpha's workload serves, unaffected by the request held for the other.
    answer = await sdk.completions.create(model="alpha", prompt="a", max_tokens=3)
    assert answer.usage is not None and answer.usage.completion_tokens == 3
    assert [m.id for m in (await sdk.models.list()).data] == ["alpha", "beta"]

    # An unknown model: 404 in OpenAI's shape, naming the models this gateway serves.
    with pytest.raises(openai.NotFoundError) as info:
        await sdk.chat.completions.create(model="gamma", messages=[{"role": "user", "content": "hi"}])
    error = info.value.body
    assert isinstance(error, dict) and error["code"] == "model_not_found"
    assert error["type"] == "invalid_request_error" and "alpha, beta" in error["message"]
    # The same on Anthropic's Messages API: its SDK reads the error in Anthropic's shape.
    async with anthropic.AsyncAnthropic(
        base_url=f"http://127.0.0.1:{gateway.port}", api_key="unused", max_retries=0
    ) as claude:
        with pytest.raises(anthropic.NotFoundError) as found:
            await claude.messages.create(
                model="gamma", max_tokens=4, messages=[{"role": "user", "content": "hi"}]
            )
    body = found.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"]["type"] == "not_found_error" and "alpha, beta" in body["error"]["message"]
    assert not waiting.done() and len(pool_b.queue) == 1

    # beta's replica comes: the held request goes to it, not to alpha's.
    beta = await start_replica(workload=other, models=("beta",), sidecar_id="replica-beta")
    held = await waiting
    assert held.usage is not None and held.usage.completion_tokens == 4
    assert len(beta.upstream.requests) == 1 and len(alpha.upstream.requests) == 1
    assert pool_b.demand.held == 0 and len(pool_b.queue) == 0

    # Each stream: the gateway's entries sum to zero, and nothing of beta landed in alpha's.
    await gateway.stop()
    await beta.sidecar.stop()
    for name in (workload, other):
        mine = [r for _, r in entries(redis_url, name) if r.role == GATEWAY]
        assert totals(mine) == {"sp": 0, "sg": 0, "ap": 0, "ag": 0, "rq": 0}
        assert arrivals(mine) == 0
    assert not [r for _, r in entries(redis_url, workload) if "beta" in r.models]
    await sdk.close()


async def test_the_workload_that_names_no_models_takes_the_others(
    start_gateway: StartGateway, workload: str, other: str
) -> None:
    gateway = await start_gateway(workload=f"{workload}=alpha;{other}")
    pool_a, pool_other = gateway.pools.pools
    sdk = client(gateway.port, timeout=0.5)
    async with aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{gateway.port}/v1/completions"
        async with http.post(url, json={"prompt": "p", "max_tokens": 2}) as response:
            assert response.status == 404
            assert "names no model" in (await response.json())["error"]["message"]
    # At zero, ``other`` may serve any model no workload names: it holds the request.
    for model, pool in (("x", pool_other), ("alpha", pool_a)):
        call = asyncio.create_task(sdk.completions.create(model=model, prompt="p", max_tokens=2))
        await wait_for(lambda pool=pool: len(pool.queue) == 1, what=f"{model} held")
        with pytest.raises(openai.APITimeoutError):
            await call
        await wait_for(lambda pool=pool: len(pool.queue) == 0, what="the client gone")
    await sdk.close()


async def test_a_model_no_live_replica_announces_gets_404(
    start_gateway: StartGateway, start_replica: StartReplica
) -> None:
    await start_replica()  # announces the fake server's models: ["fake"]
    gateway = await start_gateway()
    await wait_for(lambda: gateway.pools.models() == ["fake"], what="fake")
    sdk = client(gateway.port)
    with pytest.raises(openai.NotFoundError, match="serves: fake"):
        await sdk.completions.create(model="nope", prompt="p", max_tokens=2)
    answer = await sdk.completions.create(model="fake", prompt="p", max_tokens=2)
    assert answer.usage is not None and answer.usage.completion_tokens == 2
    await sdk.close()


def test_the_workload_flag_repeats_and_names_models() -> None:
    config = GatewayConfig.load(
        ["--workload", "llm/a=m1,m2", "--workload", "llm/b=m3", "--workload", "llm/c"], environ={}
    )
    assert config.routes == (Route("llm/a", ("m1", "m2")), Route("llm/b", ("m3",)), Route("llm/c"))
    env = GatewayConfig.load([], environ={"TOKEN_SCALER_WORKLOAD": "llm/a=m1; llm/b=m3"})
    assert [r.workload for r in env.routes] == ["llm/a", "llm/b"]
    assert parse_routes("llm/a") == (Route("llm/a"),)


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ("llm/a=m1;llm/b=m1", "'m1' is named for both llm/a and llm/b"),
        ("llm/a;llm/b", "at most one workload may name no models"),
        ("llm/a=m1;llm/a=m2", "llm/a is given twice"),
        ("nope=m1", "'nope'"),
        ("llm/a=", "expected model names"),
    ],
)
def test_bad_workload_flags_are_named(raw: str, says: str) -> None:
    with pytest.raises(ConfigError, match="--workload") as info:
        GatewayConfig.load(["--workload", raw], environ={})
    assert says in str(info.value)
