"""Fixtures: a gateway in this process, and replicas (a fake model server + a real sidecar) on demand."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from gateway.config import GatewayConfig
from gateway.pool import Pool
from gateway.server import Gateway
from sidecar.server import Sidecar
from tests.conftest import delete_keys
from tests.sidecar.conftest import started_sidecar
from tests.sidecar.fake_upstream import FakeUpstream
from token_scaler.record import KEY_PREFIX


@dataclass
class Replica:
    upstream: FakeUpstream
    sidecar: Sidecar

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sidecar.port}"


def only(gateway: Gateway) -> Pool:
    """The gateway's one workload."""
    [pool] = gateway.pools.pools
    return pool


@pytest.fixture
def other(redis_url: str, workload: str) -> Iterator[str]:
    """A second workload in the test's namespace; its keys are deleted afterwards (a test
    stops what writes them first: the fixtures' own teardown may come after this one's)."""
    name = workload.split("/")[0] + "/other"
    yield name
    delete_keys(redis_url, f"{KEY_PREFIX}:{{{name}}}*")


StartReplica = Callable[..., Awaitable[Replica]]
StartGateway = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def start_replica(
    redis_url: str, workload: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[StartReplica]:
    """A fake model server with a sidecar that announces itself (POD_IP=127.0.0.1)."""
    monkeypatch.setenv("POD_IP", "127.0.0.1")
    started: list[Replica] = []

    async def start(**overrides: Any) -> Replica:
        upstream = FakeUpstream()
        await upstream.start()
        settings = {"flush_interval_s": 0.2, **overrides}
        sidecar = await started_sidecar(redis_url, workload, upstream, f"replica-{len(started)}", **settings)
        replica = Replica(upstream, sidecar)
        started.append(replica)
        return replica

    try:
        yield start
    finally:
        for replica in started:
            if replica.sidecar.ready:
                await replica.sidecar.stop()
            await replica.upstream.stop()


@pytest.fixture
async def start_gateway(redis_url: str, workload: str) -> AsyncIterator[StartGateway]:
    started: list[Gateway] = []

    async def start(**overrides: Any) -> Gateway:
        settings: dict[str, Any] = {
            "workload": workload,
            "redis_url": redis_url,
            "host": "127.0.0.1",
            "port": 0,
            "admin_port": 0,
            "shutdown_delay_s": 0.0,
            "drain_timeout_s": 5.0,
            "discovery_interval_s": 0.05,
            "replica_liveness_s": 3.0,
            "queue_timeout_s": 30.0,
            "gateway_id": f"gw-{len(started)}",
        }
        settings.update(overrides)
        gateway = Gateway(GatewayConfig(**settings), CollectorRegistry())
        await gateway.start()
        started.append(gateway)
        return gateway

    try:
        yield start
    finally:
        for gateway in started:
            if gateway.ready:
                await gateway.stop()
