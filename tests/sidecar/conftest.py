"""Fixtures: a fake model server and a sidecar in front of it, both on free loopback ports."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client import CollectorRegistry

from sidecar.config import SidecarConfig
from sidecar.policy.clock import Clock
from sidecar.server import Sidecar
from tests.conftest import delete_keys
from tests.sidecar.fake_upstream import FakeUpstream
from token_scaler.record import KEY_PREFIX, ModelCounts, Record, decode, stream_key


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    fake = FakeUpstream()
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


StartSidecar = Callable[..., Awaitable[Sidecar]]


async def started_sidecar(
    redis_url: str,
    workload: str,
    upstream: FakeUpstream,
    sidecar_id: str,
    /,
    policy_clock: Clock | None = None,
    **overrides: Any,
) -> Sidecar:
    """A sidecar in this process on free loopback ports in front of ``upstream``, started; no
    shutdown delay, a short drain; its policies read ``policy_clock`` when given."""
    settings: dict[str, Any] = {
        "workload": workload,
        "redis_url": redis_url,
        "upstream": f"http://127.0.0.1:{upstream.port}",
        "host": "127.0.0.1",
        "port": 0,
        "admin_port": 0,
        "shutdown_delay_s": 0.0,
        "drain_timeout_s": 5.0,
        "sidecar_id": sidecar_id,
        **overrides,
    }
    sidecar = Sidecar(SidecarConfig(**settings), CollectorRegistry(), policy_clock)
    await sidecar.start()
    return sidecar


@pytest.fixture
async def start_sidecar(redis_url: str, workload: str, upstream: FakeUpstream) -> AsyncIterator[StartSidecar]:
    """Starts sidecars (stopped at the end); the flush loop ticks only when a test says so."""
    started: list[Sidecar] = []

    async def start(**overrides: Any) -> Sidecar:
        settings = {"flush_interval_s": 3600.0, **overrides}
        sidecar = await started_sidecar(redis_url, workload, upstream, f"test-{len(started)}", **settings)
        started.append(sidecar)
        return sidecar

    try:
        yield start
    finally:
        for sidecar in started:
            if sidecar.ready:
                await sidecar.stop()
        # What their last settlements wrote, after ``policy_file`` removed the scope's keys
        # (a settlement that finds its reservation gone charges the request without it).
        delete_keys(redis_url, f"{KEY_PREFIX}:{{policy:{scope(workload)}:*")


def read_records(redis_url: str, workload: str) -> list[Record]:
    client = redis.Redis.from_url(redis_url)
    try:
        return [decode(fields) for _id, fields in client.xrange(stream_key(workload))]
    finally:
        client.close()


def totals(records: list[Record]) -> dict[str, int]:
    """Sums of every counter over the records, across models."""
    keys = ("sp", "sg", "ap", "ag", "rq")
    out = dict.fromkeys(keys, 0)
    for record in records:
        for counts in record.models.values():
            for key, value in zip(keys, counts.as_list()[:5], strict=True):
                out[key] += value
    return out


def arrivals(records: list[Record]) -> int:
    """Requests that arrived (``ar``) over the records, across models."""
    return sum(counts.arrived_requests for record in records for counts in record.models.values())


def gauges(counts: ModelCounts) -> tuple[int, int, int, int]:
    """The gauges of one model's counts: in flight, waiting, backlog prompt and generation."""
    return (counts.inflight, counts.waiting, counts.backlog_prompt, counts.backlog_generation)


@pytest.fixture
def policy_file(tmp_path: Path, workload: str, redis_url: str) -> Iterator[Path]:
    """Where the test writes its policy; it uses a scope of its own, whose keys are removed after."""
    yield tmp_path / "policy.yaml"
    delete_keys(redis_url, f"{KEY_PREFIX}:{{policy:{scope(workload)}:*")


def scope(workload: str) -> str:
    return workload.split("/")[0]
