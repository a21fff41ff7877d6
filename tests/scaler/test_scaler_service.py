"""The scaler over real gRPC and HTTP on ports, reading a real Redis, called the way KEDA calls it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from scaler._gen import externalscaler_pb2 as pb
from scaler.config import ScalerConfig
from scaler.server import ScalerServer
from tests.keda import FakeSidecar, KedaClient
from token_scaler.record import APPEND_SCRIPT, append_args, seq_key, stream_key
from token_scaler.saturation import decode as decode_saturation
from token_scaler.saturation import saturation_key


class Running:
    def __init__(self, server: ScalerServer, channel: grpc.aio.Channel) -> None:
        self.server = server
        self.channel = channel
        self.address = f"127.0.0.1:{server.grpc_port}"
        self.keda = KedaClient(channel, self.address)
        self.http = f"http://127.0.0.1:{server.http_port}"


async def debug_view(running: Running, ns: str, name: str, token: str = "t") -> dict[str, Any]:
    """The scaler's ``/debug/scalers`` page of one ScaledObject, as JSON."""
    async with (
        aiohttp.ClientSession() as http,
        http.get(
            f"{running.http}/debug/scalers/{ns}/{name}", headers={"Authorization": f"Bearer {token}"}
        ) as resp,
    ):
        body: dict[str, Any] = await resp.json()
        return body


async def start(redis_url: str, **kw: object) -> Running:
    config = ScalerConfig(grpc_port=0, http_port=0, host="127.0.0.1", redis_url=redis_url, **kw)
    server = ScalerServer(config)
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}")
    return Running(server, channel)


@pytest.fixture
async def scaler(redis_url: str, workload: str) -> AsyncIterator[Running]:
    """A scaler for this test's ``workload``: stopped before that workload's keys are removed
    (it publishes some while it runs)."""
    running = await start(redis_url, debug_token="s3cret")
    yield running
    await running.channel.close()
    await running.server.stop()


@pytest.fixture
def sync_redis(redis_url: str) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


def history(sidecar: FakeSidecar, seconds: int, **counts: int) -> None:
    """``seconds`` entries, one per second, ending now (as a sidecar flushing for that long)."""
    now = sidecar.now_ms()
    for i in range(seconds, 0, -1):
        sidecar.flush(now - i * 1000 + 1000, **counts)


async def test_keda_poll_answers(scaler: Running, sync_redis: redis.Redis, workload: str) -> None:
    ns, name = workload.split("/")
    history(FakeSidecar(sync_redis, workload, "pod-a"), 90, sp=300, sg=700)
    answer = await scaler.keda.poll(ns, name, {"tokensPerSecondPerReplica": "650", "headroom": "1.3"})
    assert answer.metric_name == "token-demand"
    assert answer.target == pytest.approx(500.0) and answer.target_int == 500
    assert answer.value == pytest.approx(1000.0, rel=0.02)
    assert answer.value_int == pytest.approx(answer.value, abs=1) and answer.value_int >= answer.value
    assert answer.active and answer.replicas == 2


async def test_demand_under_saturation_asks_for_3x(
    scaler: Running, sync_redis: redis.Redis, workload: str
) -> None:
    # Two replicas serve all they can (2 x 500 tokens/s) while 3x that arrives.
    ns, name = workload.split("/")
    for pod in ("pod-a", "pod-b"):
        history(FakeSidecar(sync_redis, workload, pod), 70, sg=500, ag=1500, gauges=(64, 40, 9000, 30000))
    answer = await scaler.keda.poll(ns, name, {"tokensPerSecondPerReplica": "500", "headroom": "1"})
    assert answer.replicas >= 6  # at least 3x the 2 replicas serving
    async with (
        aiohttp.ClientSession(headers={"Authorization": "Bearer s3cret"}) as http,
        http.get(f"{scaler.http}/debug/scalers/{workload}") as resp,
    ):
        body = await resp.json()
    assert body["evaluation"]["rule"] == "stable-arrival"
    async with aiohttp.ClientSession() as http, http.get(f"{scaler.http}/metrics") as resp:
        metrics = await resp.text()
    labels = f'namespace="{ns}",scaledobject="{name}"'
    assert f"tokenscaler_scaler_served_tokens_per_second{{{labels}}} 1000.0" in metrics
    assert f"tokenscaler_scaler_arrived_tokens_per_second{{{labels}}} 3000.0" in metrics
    assert body["sidecars"]["live"] == 2 and body["sidecars"]["waitingForFirstToken"] == 80
    assert body["sidecars"]["backlogGenerationTokens"] == 60000


async def test_activation_threshold(scaler: Running, sync_redis: redis.Redis, workload: str) -> None:
    ns, name = workload.split("/")
    history(FakeSidecar(sync_redis, workload, "pod-a"), 30, sg=50)
    low = await scaler.keda.poll(
        ns, name, {"tokensPerSecondPerReplica": "100", "activationTokensPerSecond": "60"}
    )
    high = await scaler.keda.poll(
        ns, name, {"tokensPerSecondPerReplica": "100", "activationTokensPerSecond": "40"}
    )
    assert not low.active and high.active
    assert low.value == pytest.approx(50, rel=0.05)


async def test_no_data_is_zero_and_inactive(scaler: Running, workload: str) -> None:
    ns, name = workload.split("/")
    answer = await scaler.keda.poll(ns, name, {"tokensPerSecondPerReplica": "100"})
    assert answer.value == 0 and answer.value_int == 0 and not answer.active


@pytest.mark.parametrize("method", ["GetMetricSpec", "GetMetrics", "IsActive"])
async def test_bad_metadata_is_invalid_argument(scaler: Running, workload: str, method: str) -> None:
    ns, name = workload.split("/")
    ref = scaler.keda.ref(ns, name, {"tokensPerSecondPerReplica": "100", "windowSeconds": "5"})
    call = getattr(scaler.keda.stub, method)
    request = (
        pb.GetMetricsRequest(scaledObjectRef=ref, metricName="token-demand")
        if method == "GetMetrics"
        else ref
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(request, timeout=3)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = info.value.details() or ""
    assert (
        "windowSeconds" in details
        and "'5'" in details
        and "from 10 to 600" in details
        and workload in details
    )


async def test_corrupt_entries_are_skipped_and_counted(
    scaler: Running, sync_redis: redis.Redis, workload: str
) -> None:
    ns, name = workload.split("/")
    sidecar = FakeSidecar(sync_redis, workload, "pod-a")
    key = stream_key(workload)
    sync_redis.xadd(key, {"garbage": "yes"})
    history(sidecar, 30, sg=100)
    sync_redis.xadd(key, {"v": "1", "sc": "pod-x", "seq": "1", "ts": "1", "dt": "1000", "m": "{not json"})
    sync_redis.xadd(key, {"v": "9", "sc": "pod-x", "seq": "2", "ts": "1", "dt": "1000", "m": "{}"})
    answer = await scaler.keda.poll(ns, name, {"tokensPerSecondPerReplica": "100"})
    assert answer.value == pytest.approx(100, rel=0.05)
    async with aiohttp.ClientSession(headers={"Authorization": "Bearer s3cret"}) as http:
        async with http.get(f"{scaler.http}/debug/scalers/{workload}") as resp:
            body = await resp.json()
        async with http.get(f"{scaler.http}/metrics") as resp:
            metrics = await resp.text()
    assert body["stream"]["badEntries"] == 3 and body["stream"]["entriesRead"] == 30
    assert 'tokenscaler_scaler_bad_entries_total{field="m"} 1.0' in metrics
    assert 'tokenscaler_scaler_bad_entries_total{field="v"} 2.0' in metrics


async def test_an_entry_stored_again_counts_once(
    scaler: Running, sync_redis: redis.Redis, workload: str
) -> None:
    """Redis restarted without persistence forgets the seq keys, and an append whose reply the
    crash lost is stored again: the scaler skips the seq it applied already."""
    ns, name = workload.split("/")
    # 400: the 6,000 tokens of one second stay under the per-sidecar ceiling (20 x 400)
    meta = {"tokensPerSecondPerReplica": "400"}
    sidecar = FakeSidecar(sync_redis, workload, "pod-a")
    await scaler.keda.poll(ns, name, meta)  # the scaler follows the stream from here on

    async with aiohttp.ClientSession(headers={"Authorization": "Bearer s3cret"}) as http:

        async def read(entries: int) -> dict[str, int]:
            """The debug view's stream counts once the scaler has seen ``entries`` entries."""
            for _ in range(200):
                async with http.get(f"{scaler.http}/debug/scalers/{workload}") as resp:
                    stream: dict[str, int] = (await resp.json())["stream"]
                if stream["entriesRead"] + stream["duplicateEntries"] >= entries:
                    break
                await asyncio.sleep(0.05)
            return stream

        now = sidecar.now_ms()  # seconds that have ended: the answer holds what they describe
        for i in range(31, 2, -1):
            sidecar.flush(now - i * 1000, sg=100)
        last = sidecar.flush(now - 2000, sg=6000)
        await read(30)
        before = (await scaler.keda.poll(ns, name, meta)).value
        sync_redis.delete(seq_key(workload, "pod-a"))
        keys = (stream_key(workload), seq_key(workload, "pod-a"))
        sync_redis.eval(APPEND_SCRIPT, 2, *keys, *append_args([last], 1200))
        assert sync_redis.xlen(stream_key(workload)) == 31  # stored twice
        other = FakeSidecar(sync_redis, workload, "pod-b")
        other.seq = last.seq - 1  # the same seq from another sidecar is another entry
        other.flush(sg=0)
        stream = await read(32)
        async with http.get(f"{scaler.http}/metrics") as resp:
            metrics = await resp.text()
    assert (stream["entriesRead"], stream["duplicateEntries"]) == (31, 1)
    assert "tokenscaler_scaler_duplicate_entries_total 1.0" in metrics
    after = (await scaler.keda.poll(ns, name, meta)).value
    assert before > 250  # the 6000 tokens are in: twice, they would add as much again
    assert after == pytest.approx(before, rel=0.05)


async def test_debug_endpoint(scaler: Running, sync_redis: redis.Redis, workload: str) -> None:
    ns, name = workload.split("/")
    history(FakeSidecar(sync_redis, workload, "pod-a"), 20, sp=10, sg=20, tenants={"acme": (10, 20, 1)})
    await scaler.keda.poll(ns, name, {"tokensPerSecondPerReplica": "100"})
    async with aiohttp.ClientSession() as anonymous:
        async with anonymous.get(f"{scaler.http}/debug/scalers") as resp:
            assert resp.status == 401
        async with anonymous.get(f"{scaler.http}/healthz") as resp:
            assert resp.status == 200
        async with anonymous.get(f"{scaler.http}/readyz") as resp:
            assert resp.status == 200
    async with aiohttp.ClientSession(headers={"Authorization": "Bearer s3cret"}) as http:
        async with http.get(f"{scaler.http}/debug/scalers") as resp:
            listing = await resp.json()
        async with http.get(f"{scaler.http}/debug/scalers/nope/nothing") as resp:
            assert resp.status == 404
    (obj,) = [o for o in listing["scaledObjects"] if o["namespace"] == ns]
    assert obj["settings"]["workload"] == workload and obj["metadata"]["scalerAddress"] == scaler.address
    assert obj["lastValueReturned"] == pytest.approx(30, rel=0.05)
    assert set(obj["lastAsked"]) == {"GetMetricSpec", "GetMetrics", "IsActive"}
    ev = obj["evaluation"]
    # 20 one-second entries: the covered span is 20 s give or take the second the poll fell in
    assert ev["hpaDesiredReplicas"] == 1 and 19 <= ev["windowCoverageSeconds"] <= 21
    assert f"covers only {ev['windowCoverageSeconds']:.0f}s of 60s" in ev["reason"]
    assert ev["stable"]["servedPromptTokensPerSecond"] == pytest.approx(10, rel=0.06)
    # 20 tokens/s over the 20 s covered (rates divide by covered seconds, as the windows do)
    assert obj["tenantsLast60s"]["acme"]["generationTokensPerSecond"] == pytest.approx(20, rel=0.06)


async def test_health_and_reflection(scaler: Running) -> None:
    health = health_pb2_grpc.HealthStub(scaler.channel)
    for _ in range(50):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=3)
        if reply.status == health_pb2.HealthCheckResponse.SERVING:
            break
        await asyncio.sleep(0.1)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    named = await health.Check(
        health_pb2.HealthCheckRequest(service="externalscaler.ExternalScaler"), timeout=3
    )
    assert named.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(scaler.channel)

    async def requests() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    async for response in stub.ServerReflectionInfo(requests()):
        names = {s.name for s in response.list_services_response.service}
        assert "externalscaler.ExternalScaler" in names and "grpc.health.v1.Health" in names
        break


async def test_stream_is_active_sends_true_once_per_activation_and_ends_cleanly(
    redis_url: str, sync_redis: redis.Redis, workload: str
) -> None:
    running = await start(redis_url)
    ns, name = workload.split("/")
    ref = running.keda.ref(ns, name, {"tokensPerSecondPerReplica": "100", "windowSeconds": "10"})
    call = running.keda.stub.StreamIsActive(ref)
    received: list[bool] = []

    async def consume() -> None:
        async for message in call:
            received.append(message.result)

    consumer = asyncio.create_task(consume())
    await asyncio.sleep(1.5)
    assert received == []  # inactive: nothing is sent, false never is
    sidecar = FakeSidecar(sync_redis, workload, "pod-a")
    for _ in range(4):  # active for 4 s: exactly one true
        sidecar.flush(sg=100)
        await asyncio.sleep(1)
    assert received == [True]
    # Idle until the 10 s window is empty (inactive), then active again: a second true.
    for _ in range(120):
        ev = await running.server.registry.evaluate(running.server.registry.objects[(ns, name)])
        if not ev.active:
            break
        await asyncio.sleep(0.25)
    await asyncio.sleep(1.2)
    sidecar.flush(sg=100)
    for _ in range(40):
        if len(received) == 2:
            break
        await asyncio.sleep(0.1)
    assert received == [True, True]
    await running.server.stop()  # shutdown ends the stream with OK, not an error
    await asyncio.wait_for(consumer, 5)
    assert await call.code() == grpc.StatusCode.OK
    await running.channel.close()


async def test_stream_metric_spec(redis_url: str, workload: str) -> None:
    running = await start(redis_url)
    ns, name = workload.split("/")
    call = running.keda.stub.StreamMetricSpec(
        running.keda.ref(ns, name, {"tokensPerSecondPerReplica": "260"})
    )
    first = await asyncio.wait_for(call.read(), 3)
    assert first.metricSpecs[0].targetSizeFloat == pytest.approx(200)
    spec = await running.keda.stub.GetMetricSpec(
        running.keda.ref(ns, name, {"tokensPerSecondPerReplica": "260"})
    )
    assert spec == first  # GetMetricSpec equals the latest streamed value
    await running.server.stop()
    assert await asyncio.wait_for(call.read(), 5) == grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK
    await running.channel.close()


async def test_saturation_signal_for_the_sidecars(
    scaler: Running, sync_redis: redis.Redis, workload: str
) -> None:
    ns, name = workload.split("/")
    for pod in ("pod-a", "pod-b"):  # saturated: 3x the served rate arrives
        history(FakeSidecar(sync_redis, workload, pod), 30, sg=500, ag=1500)
    await scaler.keda.poll(
        ns, name, {"tokensPerSecondPerReplica": "500", "headroom": "1", "maxReplicas": "4"}
    )
    raw = None
    for _ in range(40):  # published once a second
        raw = sync_redis.get(saturation_key(workload))
        if raw is not None:
            break
        await asyncio.sleep(0.1)
    signal = decode_saturation(raw, FakeSidecar(sync_redis, workload, "x").now_ms())
    assert signal.saturated and signal.reason == "max-replicas" and signal.desired == 6 and signal.max == 4
    assert 0 < sync_redis.pttl(saturation_key(workload)) <= 30_000


@pytest.mark.parametrize("debug_open", [False, True])
async def test_the_debug_page_needs_a_token_unless_started_open(redis_url: str, debug_open: bool) -> None:
    running = await start(redis_url, debug_open=debug_open)
    try:
        async with aiohttp.ClientSession() as http, http.get(f"{running.http}/debug/scalers") as resp:
            body = await resp.json()
        if debug_open:
            assert resp.status == 200 and "scaledObjects" in body
        else:
            assert resp.status == 403 and "--debug-token" in body["error"]
    finally:
        await running.channel.close()
        await running.server.stop()
