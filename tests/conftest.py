"""Fixtures that give tests real services.

Redis: ``REDIS_URL`` when set; else the Redis on 127.0.0.1:6379 when it answers; else a
``redis-server`` from PATH on a free port; else testcontainers when a Docker engine
answers. Tests that stop and restart Redis get their own server (``own_redis``).
Each test gets its own workload name, so keys never collide, and its keys are removed.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator

import pytest
import redis

from token_scaler.record import KEY_PREFIX
from token_scaler.redis_conn import LocalRedis, answers


def _start_container() -> tuple[str, object]:
    from testcontainers.redis import RedisContainer  # type: ignore[import-not-found]

    container = RedisContainer()
    container.start()
    host = container.get_container_host_ip()
    port = container.get_exposed_port(6379)
    return f"redis://{host}:{port}/0", container


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    url = os.environ.get("REDIS_URL")
    if url:
        yield url
        return
    if answers("redis://127.0.0.1:6379/0"):
        yield "redis://127.0.0.1:6379/0"
        return
    if shutil.which("redis-server"):
        server = LocalRedis.start()
        try:
            yield server.url
        finally:
            server.stop()
        return
    try:
        url, container = _start_container()
    except Exception as exc:  # any failure here means: no way to get a Redis
        pytest.skip(f"no Redis: REDIS_URL unset, none on 6379, no redis-server, no Docker ({exc})")
    try:
        yield url
    finally:
        container.stop()  # type: ignore[attr-defined]


@pytest.fixture
def own_redis() -> Iterator[LocalRedis]:
    """A private redis-server that a test may stop and restart."""
    if not shutil.which("redis-server"):
        pytest.skip("redis-server is not on PATH")
    server = LocalRedis.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def workload(redis_url: str) -> Iterator[str]:
    """A workload name of this test's own; its keys are deleted afterwards."""
    name = f"test-{uuid.uuid4().hex[:10]}/llm"
    yield name
    delete_keys(redis_url, f"{KEY_PREFIX}:{{{name}}}*")


def delete_keys(redis_url: str, pattern: str) -> None:
    """Remove what a test left in Redis under ``pattern``."""
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=pattern, count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()
