"""Cost per 1k tokens and spend in /debug/scalers and /metrics: the real scaler reading a real Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from tests.keda import FakeSidecar
from tests.scaler.test_scaler_service import Running, history, start
from token_scaler.pricing import PriceTable, load

# 3.00 $/h per replica; "llm" workloads are priced by the test below, others are not.
PRICES = "instanceTypes:\n  gpu: {instance: 2.50, storage: 0.30, network: 0.20}\nworkloads: {}\n"
SETTINGS = {"tokensPerSecondPerReplica": "1000"}


def _table(tmp_path: Path, workload: str) -> PriceTable:
    path = tmp_path / "prices.yaml"
    path.write_text(PRICES.replace("workloads: {}", f"workloads: {{{workload}: gpu}}"))
    return load(path)


@pytest.fixture
def sync_redis(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


@pytest.fixture
async def priced(redis_url: str, workload: str, tmp_path: Path) -> AsyncIterator[Running]:
    # a long liveness, so that both sidecars count as live however slow the machine
    running = await start(redis_url, prices=_table(tmp_path, workload), liveness_s=120.0, debug_open=True)
    yield running
    await running.channel.close()
    await running.server.stop()


async def _debug(running: Running, workload: str) -> dict[str, Any]:
    ns, name = workload.split("/")
    await running.keda.poll(ns, name, SETTINGS)
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{running.http}/debug/scalers/{ns}/{name}") as resp,
    ):
        assert resp.status == 200
        body: dict[str, Any] = await resp.json()
        return body


async def _metrics(running: Running) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with aiohttp.ClientSession() as http, http.get(f"{running.http}/metrics") as resp:
        text = await resp.text()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_cost_and_spend_by_hand(priced: Running, sync_redis: redis.Redis, workload: str) -> None:
    # Two pods, each serving 300 prompt + 700 generated tokens/s, 80 % for acme, 20 % for beta.
    for pod in ("pod-a", "pod-b"):
        history(
            FakeSidecar(sync_redis, workload, pod),
            75,
            sp=300,
            sg=700,
            tenants={"acme": (240, 560, 1), "beta": (60, 140, 1)},
        )
    body = await _debug(priced, workload)
    cost = body["cost"]
    # 2 replicas x 3.00 $/h = 6 $/h; 2000 tokens/s = 7.2M tokens/h -> 6 / 7.2M x 1000 $ per 1k tokens
    assert cost["priced"] and cost["replicas"] == 2 and cost["instanceType"] == "gpu"
    assert cost["pricePerReplicaPerHour"] == pytest.approx(3.0)
    assert cost["costPerHour"] == pytest.approx(6.0)
    assert cost["tokensPerSecond"] == pytest.approx(2000.0)
    assert cost["costPer1kTokens"] == pytest.approx(6 / 7_200_000 * 1000, rel=1e-5)
    assert cost["models"]["m"]["costPer1kTokens"] == pytest.approx(6 / 7_200_000 * 1000, rel=1e-5)
    assert cost["spendPerHourByTenant"] == {"acme": pytest.approx(4.8), "beta": pytest.approx(1.2)}
    # the existing view is untouched
    assert body["sidecars"]["live"] == 2 and body["evaluation"]["rule"].startswith("stable")

    ns, name = workload.split("/")
    samples = await _metrics(priced)
    base = (("namespace", ns), ("workload", name))
    assert samples[("tokenscaler_cost_dollars_per_hour", base)] == pytest.approx(6.0)
    assert samples[
        ("tokenscaler_cost_per_1k_tokens", tuple(sorted((*base, ("model", "m")))))
    ] == pytest.approx(6 / 7_200_000 * 1000)
    spend = {
        dict(labels)["tenant"]: value
        for (metric, labels), value in samples.items()
        if metric == "tokenscaler_spend_dollars_per_hour" and dict(labels).get("workload") == name
    }
    assert spend == {"acme": pytest.approx(4.8), "beta": pytest.approx(1.2)}


async def test_idle_replicas_cost_without_a_cost_per_token(
    priced: Running, sync_redis: redis.Redis, workload: str
) -> None:
    history(FakeSidecar(sync_redis, workload, "pod-a"), 20)  # a sidecar flushing empty intervals
    cost = (await _debug(priced, workload))["cost"]
    assert cost["replicas"] == 1 and cost["costPerHour"] == pytest.approx(3.0)
    assert cost["costPer1kTokens"] is None and cost["models"] == {}
    ns, name = workload.split("/")
    samples = await _metrics(priced)
    assert samples[("tokenscaler_cost_dollars_per_hour", (("namespace", ns), ("workload", name)))] == 3.0
    assert not [k for k in samples if k[0] == "tokenscaler_cost_per_1k_tokens" and ("workload", name) in k[1]]


async def test_unpriced_workload_says_why(priced: Running, sync_redis: redis.Redis, workload: str) -> None:
    other = workload.replace("/llm", "/other")
    try:
        history(FakeSidecar(sync_redis, other, "pod-a"), 10, sp=10, sg=10)
        cost = (await _debug(priced, other))["cost"]
        assert cost["priced"] is False and "not in the price table" in cost["reason"]
        samples = await _metrics(priced)
        assert not [
            k for k in samples if ("workload", "other") in k[1] and k[0].startswith("tokenscaler_cost")
        ]
    finally:
        sync_redis.delete(*sync_redis.keys(f"*{{{other}}}*"))


async def test_without_a_price_table_the_debug_view_says_so(
    redis_url: str, sync_redis: redis.Redis, workload: str
) -> None:
    running = await start(redis_url, debug_open=True)
    try:
        history(FakeSidecar(sync_redis, workload, "pod-a"), 5, sp=10, sg=10)
        cost = (await _debug(running, workload))["cost"]
        assert cost["priced"] is False and "--prices" in cost["reason"]
        assert not [k for k in await _metrics(running) if k[0].startswith("tokenscaler_cost")]
    finally:
        await running.channel.close()
        await running.server.stop()
