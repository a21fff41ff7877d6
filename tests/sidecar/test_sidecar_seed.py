"""A new sidecar starts its generation estimates from its workload's stream, not the default."""

from __future__ import annotations

import redis
import redis.asyncio as aioredis

from sidecar.flush import recent_generation_means
from sidecar.meter import DEFAULT_GENERATION_ESTIMATE, Meter
from tests.keda import FakeSidecar
from token_scaler.record import stream_key


async def test_means_from_the_stream_seed_only_unseen_models(redis_url: str, workload: str) -> None:
    sync = redis.Redis.from_url(redis_url)
    peer = FakeSidecar(sync, workload, "peer-1")
    for _ in range(10):
        peer.flush(model="big", sg=300, rq=10)  # 30 generated tokens per ended request
        peer.flush(model="rare", sg=900, rq=0)
    peer.flush(model="rare", sg=0, rq=1)  # one ended request: too few to trust
    sync.xadd(stream_key(workload), {"garbage": "1"})  # skipped, not fatal
    client = aioredis.Redis.from_url(redis_url)
    try:
        means = await recent_generation_means(client, workload)
    finally:
        await client.aclose()
        sync.close()
    assert means == {"big": 30.0}

    meter = Meter()
    meter.seed_generation_means({"big": 30.0})
    assert meter.generation_estimate("big", None) == 30
    assert meter.generation_estimate("big", 20) == 20  # max_tokens still caps it
    assert meter.generation_estimate("other", None) == DEFAULT_GENERATION_ESTIMATE


def test_seeding_never_overrides_what_the_sidecar_learnt() -> None:
    meter = Meter()
    request = meter.arrive("big", "t", prompt_estimate=10, generation_estimate=256)
    meter.first_token(request)
    meter.finish(request, prompt=10, generation=100)
    meter.seed_generation_means({"big": 30.0})
    assert meter.generation_estimate("big", None) == 100


async def test_no_stream_no_means(redis_url: str, workload: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        assert await recent_generation_means(client, workload) == {}
    finally:
        await client.aclose()
