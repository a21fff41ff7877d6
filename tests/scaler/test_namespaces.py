"""A ScaledObject reads only workloads of its own namespace unless the scaler allows more, and only
ScaledObjects of a workload's own namespace decide its saturation signal."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
import redis

from scaler._gen import externalscaler_pb2 as pb
from scaler.config import ScalerConfig
from scaler.metrics import ScalerMetrics
from scaler.namespaces import parse_access
from scaler.reader import StreamReader
from scaler.registry import Registry
from scaler.series import WorkloadSeries
from tests.keda import FakeSidecar
from tests.scaler.test_scaler_service import Running, history, start
from token_scaler import model_keys
from token_scaler.errors import ConfigError, MetadataError

CAPACITY = {"tokensPerSecondPerReplica": "100"}


def test_access_rules() -> None:
    default = parse_access("team-a:shared")
    assert default.allows("rt", "rt/app") and default.allows("team-a", "shared/llm")
    assert not default.allows("other", "rt/app") and not default.allows("team-a", "rt/app")
    assert parse_access("*").allows("other", "rt/app")
    assert parse_access("*:shared").allows("x", "shared/llm")
    with pytest.raises(ValueError, match="expected"):
        parse_access("team-a")
    with pytest.raises(ConfigError, match="TOKEN_SCALER_ALLOW_CROSS_NAMESPACE"):
        ScalerConfig.from_args([], {"TOKEN_SCALER_ALLOW_CROSS_NAMESPACE": "a:B_"})
    assert ScalerConfig.from_args(["--allow-cross-namespace", "a:b"], {}).cross_namespace == parse_access(
        "a:b"
    )


async def test_saturation_comes_only_from_the_workloads_own_namespace() -> None:
    reader = StreamReader(client=None, metrics=ScalerMetrics())
    reader._mark_ok()
    reader.series["rt/app"] = WorkloadSeries()
    with pytest.raises(MetadataError, match="own namespace"):
        Registry(reader, reader.metrics).resolve(
            "other", "evil", {**CAPACITY, "workload": "rt/app"}, "GetMetrics"
        )
    registry = Registry(reader, reader.metrics, access=parse_access("other:rt"))
    # No data: the demand asks for 0 replicas; maxReplicas 0 would read any demand as saturation.
    registry.resolve("other", "evil", {**CAPACITY, "workload": "rt/app", "maxReplicas": "1"}, "GetMetrics")
    assert await registry.saturation() == {}  # read, but it decides nothing for rt/app
    registry.resolve("rt", "app", {**CAPACITY, "maxReplicas": "1"}, "GetMetrics")
    assert list(await registry.saturation()) == ["rt/app"]


async def test_another_namespace_is_invalid_argument_over_grpc(
    scaler_open: Running, redis_url: str, workload: str
) -> None:
    history(FakeSidecar(redis.Redis.from_url(redis_url), workload, "pod-a"), 10, sg=500)
    ref = scaler_open.keda.ref("other", "evil", {**CAPACITY, "workload": workload})
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await scaler_open.keda.stub.GetMetrics(
            pb.GetMetricsRequest(scaledObjectRef=ref, metricName="token-demand"), timeout=3
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "own namespace" in (info.value.details() or "")
    ns, name = workload.split("/")
    assert await scaler_open.keda.poll(ns, name, CAPACITY) is not None


@pytest.fixture
async def scaler_open(redis_url: str, workload: str) -> AsyncIterator[Running]:
    """Stopped before ``workload``'s keys are removed: it publishes some while it runs."""
    running = await start(redis_url)
    yield running
    await running.channel.close()
    await running.server.stop()


async def test_the_scaler_publishes_the_models_its_scaledobjects_count(
    scaler_open: Running, redis_url: str, workload: str
) -> None:
    client = redis.Redis.from_url(redis_url)
    history(FakeSidecar(client, workload, "pod-a"), 10, sg=500)
    ns, name = workload.split("/")
    await scaler_open.keda.poll(ns, name, {**CAPACITY, "model": "llama-8b"})
    key = model_keys.models_key(workload)
    for _ in range(60):
        if client.get(key) is not None:
            break
        await asyncio.sleep(0.05)
    assert model_keys.decode(client.get(key)) == ["llama-8b"]
    client.close()
