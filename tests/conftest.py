"""Fixtures that give tests real services.

Redis: ``REDIS_URL`` when set; else a ``redis-server`` from PATH that the session starts on a
free port; else testcontainers when a Docker engine answers. A Redis that merely answers on
6379 is never used: it may be someone else's. Tests that stop and restart Redis get their own
server (``own_redis``).

Each test gets its own workload name, so keys never collide, and its keys are removed. On the
session's own Redis every test module is checked for that: a key it leaves behind fails its
last test (at teardown) and is then removed. A Redis given by ``REDIS_URL`` is never flushed,
and is not checked that way (other clients may write to it meanwhile).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from token_scaler.record import workload_keys
from token_scaler.redis_conn import LocalRedis, sync_client


@dataclass(frozen=True)
class SessionRedis:
    url: str
    own: bool  # started by this session: nothing else writes to it


def _start_container() -> tuple[str, object]:
    from testcontainers.redis import RedisContainer  # type: ignore[import-not-found]

    container = RedisContainer()
    container.start()
    host = container.get_container_host_ip()
    port = container.get_exposed_port(6379)
    return f"redis://{host}:{port}/0", container


# The session's Redis once a test has asked for it (the fixture is lazy).
_started: list[SessionRedis] = []


@pytest.fixture(scope="session")
def session_redis() -> Iterator[SessionRedis]:
    url = os.environ.get("REDIS_URL")
    if url:
        yield from _serving(SessionRedis(url, own=False))
        return
    if shutil.which("redis-server"):
        server = LocalRedis.start()
        try:
            yield from _serving(SessionRedis(server.url, own=True))
        finally:
            server.stop()
        return
    try:
        url, container = _start_container()
    except Exception as exc:  # any failure here means: no way to get a Redis
        pytest.skip(f"no Redis: REDIS_URL unset, no redis-server on PATH, no Docker ({exc})")
    try:
        yield from _serving(SessionRedis(url, own=True))
    finally:
        container.stop()  # type: ignore[attr-defined]


def _serving(session: SessionRedis) -> Iterator[SessionRedis]:
    _started.append(session)
    try:
        yield session
    finally:
        _started.remove(session)


@pytest.fixture(scope="session")
def redis_url(session_redis: SessionRedis) -> str:
    return session_redis.url


def _keys(url: str) -> set[bytes]:
    client = redis.Redis.from_url(url)
    try:
        return set(client.scan_iter(count=1000))
    finally:
        client.close()


def _delete(url: str, keys: list[bytes]) -> None:
    client = redis.Redis.from_url(url)
    try:
        client.delete(*keys)
    finally:
        client.close()


@pytest.fixture(scope="module", autouse=True)
def leaves_no_keys(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fails a test module that leaves keys in the session's own Redis, then removes them.

    Module scope and autouse: torn down after every fixture of the module (module-scoped
    fleets of processes included), so their clean-up has run when it looks."""
    before = {s.url: _keys(s.url) for s in _started if s.own}
    yield
    for session in [s for s in _started if s.own]:
        left = sorted(_keys(session.url) - before.get(session.url, set()))
        if left:
            _delete(session.url, left)
            pytest.fail(
                f"{request.node.nodeid} left {len(left)} keys in Redis: {[k.decode() for k in left[:20]]}",
                pytrace=False,
            )


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
    delete_keys(redis_url, workload_keys(name))


def delete_keys(redis_url: str, pattern: str) -> None:
    """Remove what a test left in Redis under ``pattern`` (one Redis, a cluster or Sentinel's)."""
    client = sync_client(redis_url)
    try:
        for key in list(client.scan_iter(match=pattern, count=1000)):
            client.delete(key)  # one by one: a cluster deletes keys of one slot per command
    finally:
        client.close()


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A test CA (``ca.crt``) and its ``server`` and ``client`` certificates and keys, for
    127.0.0.1 and localhost."""
    if not shutil.which("openssl"):
        pytest.skip("openssl is not on PATH")
    d = tmp_path_factory.mktemp("certs")
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "1",
        "-subj",
        "/CN=test-ca",
        cwd=d,
    )
    (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for who in ("server", "client"):
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{who}.key",
            "-out",
            f"{who}.csr",
            "-subj",
            f"/CN={who}",
            cwd=d,
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{who}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{who}.crt",
            "-days",
            "1",
            "-extfile",
            "san.ext",
            cwd=d,
        )
    return d
