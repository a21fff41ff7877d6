"""The sidecar's announcement in Redis: address, models, heartbeat, in-flight tokens, leave."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from sidecar.announce import advertised_url
from tests.sidecar.conftest import StartSidecar
from tests.sidecar.fake_upstream import FakeUpstream
from token_scaler import presence
from token_scaler.presence import LIVE, Announcement, PresenceError, presence_keys


async def live(redis_url: str, workload: str, liveness_ms: int = 3000) -> dict[str, Announcement]:
    client = aioredis.Redis.from_url(redis_url)
    try:
        reply: Any = await client.eval(LIVE, 2, *presence_keys(workload), liveness_ms)
    finally:
        await client.aclose()
    return {reply[i].decode(): presence.decode(reply[i + 2]) for i in range(1, len(reply), 3)}


async def test_announces_address_models_capacity_and_leaves_at_stop(
    start_sidecar: StartSidecar, redis_url: str, workload: str
) -> None:
    sidecar = await start_sidecar(
        advertise="http://127.0.0.1:1234", models=("m1", "m2"), capacity_tokens=4000, sidecar_id="sc-a"
    )
    await asyncio.sleep(0.2)
    seen = await live(redis_url, workload)
    assert seen == {"sc-a": Announcement("http://127.0.0.1:1234", ("m1", "m2"), 4000, 0, 0, 0)}
    await sidecar.stop()
    assert await live(redis_url, workload) == {}


async def test_models_come_from_the_upstream_and_inflight_tokens_are_announced(
    start_sidecar: StartSidecar, redis_url: str, workload: str, upstream: FakeUpstream
) -> None:
    upstream.models = ["fake-1"]
    sidecar = await start_sidecar(advertise="http://127.0.0.1:9", sidecar_id="sc-b")
    assert sidecar.announcer is not None
    sidecar.announcer.interval_s = 0.05
    body = {"model": "m", "prompt": "x" * 400, "max_tokens": 30, "stream": True}
    async with aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{sidecar.port}/v1/completions"
        async with http.post(url, json=body, headers={"X-Fake-Delay": "0.05"}) as response:
            await response.content.readline()  # the stream has started
            await asyncio.sleep(0.3)
            busy = (await live(redis_url, workload))["sc-b"]
            await response.read()
    await asyncio.sleep(0.2)
    idle = (await live(redis_url, workload))["sc-b"]
    assert busy.models == ("fake-1",)
    assert busy.inflight == 1
    # The meter's arrival estimate: min(max_tokens, default mean) = 30, minus what streamed.
    assert 0 < busy.backlog_generation < 30
    assert (idle.inflight, idle.backlog_prompt, idle.backlog_generation) == (0, 0, 0)


async def test_a_silent_sidecar_drops_out_by_age(redis_url: str, workload: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        announcement = Announcement("http://127.0.0.1:1").encode()
        await client.eval(presence.HEARTBEAT, 2, *presence_keys(workload), "old", announcement, 60_000)
        assert set(await live(redis_url, workload, liveness_ms=3000)) == {"old"}
        await asyncio.sleep(0.3)
        assert await live(redis_url, workload, liveness_ms=200) == {}
    finally:
        await client.aclose()


def test_advertised_url() -> None:
    assert advertised_url("http://a:1/", 8080, {}) == "http://a:1"
    assert advertised_url(None, 8080, {"POD_IP": "10.0.0.7"}) == "http://10.0.0.7:8080"
    assert advertised_url(None, 8080, {"POD_IP": "fd00::7"}) == "http://[fd00::7]:8080"
    assert advertised_url(None, 8080, {}) is None


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ("nope", "not valid JSON"),
        (json.dumps({"v": 2, "url": "http://a"}), "v:"),
        (json.dumps({"v": 1, "url": "ftp://a"}), "url:"),
        (json.dumps({"v": 1, "url": "http://a", "models": "m"}), "models:"),
        (json.dumps({"v": 1, "url": "http://a", "capacity": -1}), "capacity:"),
        (json.dumps({"v": 1, "url": "http://a", "bg": True}), "bg:"),
    ],
)
def test_bad_announcements_name_the_field(raw: str, field: str) -> None:
    with pytest.raises(PresenceError, match=field):
        presence.decode(raw)
