"""The scaler's ceiling per sidecar and second, and the answer's cap at maxReplicas x target."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest
import redis

from scaler.ceiling import IngestCeiling, bound_answer, scaled
from scaler.metadata import parse
from scaler.series import WorkloadSeries
from scaler.window import evaluate
from tests.keda import FakeSidecar
from tests.scaler.test_scaler_service import Running, history, start
from token_scaler.record import GATEWAY, ModelCounts, Record, TenantCounts

WORKLOAD = "ns/llm"
HUGE = 10**15


def record(seq: int, ts_ms: int, sg: int, *, sidecar: str = "a", dt: int = 1000, sp: int = 0) -> Record:
    counts = ModelCounts(sp, sg, sp, sg, 1, 0, 0, 0, 0)
    return Record(sidecar, seq, ts_ms, dt, {"m": counts}, {"acme": {"m": TenantCounts(sp, sg, 1)}})


def ceiling_for(**metadata: str) -> IngestCeiling:
    ceiling = IngestCeiling()
    ceiling.watch("ns", "llm", parse({"tokensPerSecondPerReplica": "100", **metadata}, "ns", "llm"))
    return ceiling


def test_an_entry_past_the_ceiling_is_scaled_down_to_it() -> None:
    ceiling = ceiling_for()  # 20 x 100 = 2,000 weighted tokens/s per sidecar
    series = WorkloadSeries()
    honest = record(1, 10_000_500, 1500)
    assert ceiling.clamp(WORKLOAD, series, honest, "10000500-0") is honest
    series.add(honest, "10000500-0")
    # the same second: 500 are left of it
    lie = ceiling.clamp(WORKLOAD, series, record(2, 10_000_900, HUGE), "10000900-0")
    assert lie.models["m"].served_generation == 500 and lie.models["m"].arrived_generation == 500
    assert lie.tenants["acme"]["m"].generation == 500 and lie.models["m"].requests == 1
    series.add(lie, "10000900-0")
    # the next second starts afresh; a sidecar's other entries and other sidecars are apart
    assert (
        ceiling.clamp(WORKLOAD, series, record(3, 10_001_500, 2000), "10001500-0")
        .models["m"]
        .served_generation
        == 2000
    )
    assert (
        ceiling.clamp(WORKLOAD, series, record(1, 10_000_950, 2000, sidecar="b"), "10000950-0")
        .models["m"]
        .served_generation
        == 2000
    )
    assert ceiling.implausible == {WORKLOAD: 1}
    assert ceiling.clamped_between(WORKLOAD, 10_000, 10_001) == 1


def test_scaling_an_entry_keeps_its_arrivals_as_they_are() -> None:
    counts = {"m": ModelCounts(10, 4000, 10, 4000, 1, 2, 1, 0, 0, 3)}
    lie = scaled(Record("a", 1, 10_000_500, 1000, counts), 0.5)
    assert lie.models["m"] == ModelCounts(5, 2000, 5, 2000, 1, 2, 1, 0, 0, 3)
    unknown = {"m": ModelCounts(10, 4000, 10, 4000, 1, 0, 0, 0, 0, arrivals_known=False)}
    assert not scaled(Record("a", 2, 10_001_500, 1000, unknown), 0.5).models["m"].arrivals_known


def test_a_gateways_held_burst_is_not_clamped() -> None:
    # a burst held at zero replicas, then taken back count for count: both must count whole
    ceiling = ceiling_for()
    series = WorkloadSeries()
    held = record(1, 7_000_500, 400_000)
    held.role = GATEWAY
    assert ceiling.clamp(WORKLOAD, series, held, "7000500-0") is held
    assert ceiling.implausible == {}


def test_weights_intervals_duplicates_and_the_most_permissive_scaled_object() -> None:
    # prompt tokens weigh 0.1: 15,000 of them are 1,500 weighted tokens/s, under the ceiling
    ceiling = ceiling_for(promptWeight="0.1")
    series = WorkloadSeries()
    entry = record(1, 5_000_500, 0, sp=15_000)
    assert ceiling.clamp(WORKLOAD, series, entry, "5000500-0") is entry
    series.add(entry, "5000500-0")
    # an entry whose interval spans 5 s may carry 5 s worth; one that says it spans a day, a minute's
    long = record(2, 5_010_000, 9_000, dt=5000)
    assert ceiling.clamp(WORKLOAD, series, long, "5010000-0") is long
    series.add(long, "5010000-0")
    day = ceiling.clamp(WORKLOAD, WorkloadSeries(), record(1, 6_000_000, HUGE, dt=86_400_000), "6000000-0")
    assert day.models["m"].served_generation == 60 * 2000
    # an entry the series will skip as a duplicate is not judged
    assert (
        ceiling.clamp(WORKLOAD, series, record(2, 5_010_000, HUGE), "5010001-0").models["m"].served_generation
        == HUGE
    )
    # a second ScaledObject of the workload allowing more: the entry is held to the larger
    ceiling.watch(
        "ns", "other", parse({"tokensPerSecondPerReplica": "1000", "workload": WORKLOAD}, "ns", "other")
    )
    assert (
        ceiling.clamp(WORKLOAD, series, record(3, 5_020_500, 10**9), "5020500-0")
        .models["m"]
        .served_generation
        == 20_000
    )
    absolute = IngestCeiling(absolute=50.0)
    absolute.watch("ns", "llm", parse({"tokensPerSecondPerReplica": "100"}, "ns", "llm"))
    assert (
        absolute.clamp(WORKLOAD, WorkloadSeries(), record(1, 1_000, 80), "1000-0")
        .models["m"]
        .served_generation
        == 50
    )


def test_the_answer_is_capped_at_max_replicas_times_the_target() -> None:
    settings = parse({"tokensPerSecondPerReplica": "100", "headroom": "1", "maxReplicas": "5"}, "ns", "llm")
    series = WorkloadSeries()
    for i in range(30):
        series.add(record(i + 1, (1000 + i) * 1000 + 500, 900), f"{(1000 + i) * 1000 + 500}-0")
    demand = evaluate(series, settings, 1030_500)
    assert demand.value == pytest.approx(900) and demand.replicas == 9
    answer = bound_answer(demand, settings)
    assert answer.value == 500 and answer.replicas == 5 and answer.active
    assert "capped at maxReplicas 5" in answer.reason and demand.reason in answer.reason
    unbounded = parse({"tokensPerSecondPerReplica": "100", "headroom": "1"}, "ns", "llm")
    assert bound_answer(evaluate(series, unbounded, 1030_500), unbounded).value == pytest.approx(900)


@pytest.fixture
async def scaler(redis_url: str, workload: str) -> AsyncIterator[Running]:
    """Stopped before ``workload``'s keys are removed: it publishes some while it runs."""
    running = await start(redis_url, debug_token="s3cret")
    yield running
    await running.channel.close()
    await running.server.stop()


@pytest.fixture
def sync_redis(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


async def debug(scaler: Running, workload: str) -> dict[str, object]:
    async with (
        aiohttp.ClientSession(headers={"Authorization": "Bearer s3cret"}) as http,
        http.get(f"{scaler.http}/debug/scalers/{workload}") as resp,
    ):
        body: dict[str, object] = await resp.json()
        return body


async def scraped(scaler: Running) -> str:
    async with aiohttp.ClientSession() as http, http.get(f"{scaler.http}/metrics") as resp:
        return await resp.text()


@pytest.mark.parametrize("max_replicas", [None, "1"])
async def test_a_huge_count_written_straight_into_redis(
    scaler: Running, sync_redis: redis.Redis, workload: str, max_replicas: str | None
) -> None:
    ns, name = workload.split("/")
    metadata = {"tokensPerSecondPerReplica": "100", "headroom": "1"}
    if max_replicas is not None:
        metadata["maxReplicas"] = max_replicas
    honest = FakeSidecar(sync_redis, workload, "pod-a")
    history(honest, 30, sg=100, tenants={"acme": (0, 100, 1)})
    # anything with access to Redis: a record of 1e15 generated tokens, in the contract's shape
    FakeSidecar(sync_redis, workload, "pod-x").flush(sg=HUGE, rq=1, tenants={"acme": (0, HUGE, 1)})
    answer = await scaler.keda.poll(ns, name, metadata)
    body = await debug(scaler, workload)
    for _ in range(30):  # the lie's second becomes complete within a second
        if "per-sidecar ceiling" in body["evaluation"]["reason"]:  # type: ignore[index]
            break
        await asyncio.sleep(0.1)
        answer = await scaler.keda.poll(ns, name, metadata)
        body = await debug(scaler, workload)
    # the lie counts as 2,000 tokens in one second (20 replicas' worth), no more: even a
    # panic window of 6 s would hold it at no more than 100 + 2000 / 6
    assert answer.value <= 100 + 2000 / 6 + 1
    print(f"CEILING maxReplicas={max_replicas}: KEDA value {answer.value:.1f}, replicas {answer.replicas}")
    if max_replicas is not None:
        assert answer.value == 100 and answer.replicas == 1
        assert "capped at maxReplicas 1" in body["evaluation"]["reason"]  # type: ignore[index]
    else:
        assert answer.value > 120  # the lie counts, up to the ceiling
    stream = body["stream"]
    assert isinstance(stream, dict) and stream["implausibleEntries"] == 1
    evaluation = body["evaluation"]
    assert isinstance(evaluation, dict) and "per-sidecar ceiling of 2000" in evaluation["reason"]
    tenants = body["tenantsLast60s"]
    assert isinstance(tenants, dict) and tenants["acme"]["generationTokensPerSecond"] < 200
    assert "tokenscaler_scaler_implausible_entries_total 1.0" in await scraped(scaler)
