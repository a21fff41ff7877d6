"""A client that hangs up before a non-streamed answer is charged what the server generated."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from sidecar.abandon import Abandoned
from tests.sidecar.conftest import StartSidecar, read_records, scope, totals
from tests.sidecar.policy.test_policy_proxy import MESSAGES, sample, settled, used, write_policy
from tests.sidecar.vllm_like import VllmLike


def test_an_estimate_from_the_elapsed_time_never_past_the_reservation() -> None:
    abandoned = Abandoned()
    assert abandoned.generation("m", 3.0, 500) == (500, "reservation")
    abandoned.observe("m", 100, 2.0)  # 50 tokens/s
    assert abandoned.generation("m", 3.0, 500) == (150, "elapsed")
    assert abandoned.generation("m", 30.0, 500) == (500, "elapsed")
    assert abandoned.generation("other", 3.0, 7) == (7, "reservation")


@pytest.fixture
async def slow_vllm() -> AsyncIterator[VllmLike]:
    server = VllmLike(delay_s=0.01)  # 100 tokens a second
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def hang_up(port: int, max_tokens: int, after_s: float) -> None:
    body = {"model": "m", "messages": MESSAGES, "max_tokens": max_tokens}
    async with aiohttp.ClientSession() as session:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(after_s):
                await session.post(
                    f"http://127.0.0.1:{port}/v1/chat/completions", json=body, headers={"X-Tenant-ID": "t"}
                )


async def test_hanging_up_is_charged_to_budget_metrics_and_record(
    start_sidecar: StartSidecar, slow_vllm: VllmLike, policy_file: Path, workload: str, redis_url: str
) -> None:
    write_policy(
        policy_file,
        {
            "scope": scope(workload),
            "reservationChunks": {"seconds": 0},
            "defaults": {"budget": {"daily": 100_000}},
        },
    )
    sidecar = await start_sidecar(policy=policy_file, upstream=f"http://127.0.0.1:{slow_vllm.port}")
    # No rate known for the model yet: the reservation is charged (prompt estimate 12 + 300).
    await hang_up(sidecar.port, 300, 0.3)
    for _ in range(200):
        if slow_vllm.cancelled:
            break
        await asyncio.sleep(0.01)
    assert slow_vllm.cancelled == 1  # the upstream request was cancelled
    await settled(sidecar)
    assert used(redis_url, workload, "t") == 12 + 300
    # Answered once (20 tokens in about 0.2 s): the rate is learned; hanging up after 0.5 s of a
    # 3 s generation is charged for what about 0.5 s generated, well under the 300 reserved.
    async with aiohttp.ClientSession() as session:
        body = {"model": "m", "messages": MESSAGES, "max_tokens": 20}
        async with session.post(
            f"http://127.0.0.1:{sidecar.port}/v1/chat/completions", json=body, headers={"X-Tenant-ID": "t"}
        ) as response:
            answered = (await response.json())["usage"]["total_tokens"]
    await settled(sidecar)
    await hang_up(sidecar.port, 300, 0.5)
    await asyncio.sleep(0.1)
    await settled(sidecar)
    third = used(redis_url, workload, "t") - (12 + 300) - answered
    assert 12 + 5 < third < 12 + 300
    # The first request counts as "other": "m" was not answered before it (sidecar/labels.py).
    metric = sum(
        sample(sidecar, "tokenscaler_tokens_total", type=kind, model=model, tenant="t")
        for kind in ("prompt", "generation")
        for model in ("m", "other")
    )
    assert metric == used(redis_url, workload, "t")
    assert sample(sidecar, "tokenscaler_requests_total", model="other", tenant="t", code="499") == 1
    assert sample(sidecar, "tokenscaler_requests_total", model="m", tenant="t", code="499") == 1
    estimated = sample(
        sidecar,
        "tokenscaler_estimated_tokens_total",
        type="generation",
        model="m",
        tenant="t",
        method="elapsed",
    )
    assert estimated == third - 12
    sidecar.flusher.tick()
    assert await sidecar.flusher.deliver()
    counted = totals(read_records(redis_url, workload))
    assert counted["sp"] + counted["sg"] == metric and counted["rq"] == 3
