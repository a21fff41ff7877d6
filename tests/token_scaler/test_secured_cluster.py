"""The whole loop and a budget on a Redis Cluster that asks for a password and speaks TLS only
(``rediss+cluster://:password@...``), its certificate signed by a private CA that the
processes trust through ``SSL_CERT_FILE``, as a platform's internal CA usually is: sidecars
append and admit, the scaler reads every stream, all of it exact; a wrong password is refused
with a message that names the URL without the password."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import grpc
import pytest

from scaler.config import ScalerConfig
from scaler.server import ScalerServer
from tests.keda import KedaClient
from tests.token_scaler.test_failover import (
    answers_of,
    assert_exact,
    budgeted_loop,
    delivered_and_settled,
    traffic,
)
from tests.topologies import running
from token_scaler.redis_topology import LocalCluster, tls_files

pytestmark = pytest.mark.cluster

PASSWORD = "s3cret-pa55"


@pytest.fixture(scope="module")
def secured_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with running("cluster", secured=lambda: tls_files(tmp_path_factory.mktemp("tls"), PASSWORD)) as started:
        assert isinstance(started, LocalCluster)
        yield started


@pytest.fixture
def trusted(secured_cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch) -> str:
    """The cluster's URL, its CA trusted as a platform's would be (``SSL_CERT_FILE``)."""
    assert secured_cluster.secured is not None and secured_cluster.secured.ca is not None
    monkeypatch.setenv("SSL_CERT_FILE", str(secured_cluster.secured.ca))
    return secured_cluster.url


async def test_the_loop_and_a_budget_on_a_password_and_tls_cluster(trusted: str, tmp_path: Path) -> None:
    assert trusted.startswith(f"rediss+cluster://:{PASSWORD}@")
    scope = f"tls-{uuid.uuid4().hex[:8]}"
    async with (
        budgeted_loop(trusted, scope, 3, tmp_path / "policy.yaml") as loop,
        grpc.aio.insecure_channel(f"127.0.0.1:{loop.scaler.grpc_port}") as channel,
        aiohttp.ClientSession() as session,
    ):
        keda = KedaClient(channel, "scaler:9090")
        assert set((await answers_of(keda, loop.workloads)).values()) == {"OK"}
        await asyncio.gather(*(traffic(session, s, 12) for s in loop.sidecars))
        await delivered_and_settled(loop.sidecars)
        await assert_exact(loop)
        assert set((await answers_of(keda, loop.workloads)).values()) == {"OK"}


async def test_with_a_wrong_password_the_scaler_answers_unavailable_and_says_why(trusted: str) -> None:
    wrong = trusted.replace(PASSWORD, "not-the-password")
    scaler = ScalerServer(ScalerConfig(grpc_port=0, http_port=0, host="127.0.0.1", redis_url=wrong))
    await scaler.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{scaler.grpc_port}") as channel:
            answer = (await answers_of(KedaClient(channel, "scaler:9090"), ["ns/llm"]))["ns/llm"]
        assert answer.startswith("UNAVAILABLE"), answer
        assert "invalid username-password pair" in answer, answer
        assert "not-the-password" not in answer
    finally:
        await scaler.stop()
