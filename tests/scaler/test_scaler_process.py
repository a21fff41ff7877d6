"""The scaler as users run it: processes, several replicas, Redis going away, TLS, SIGTERM."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench._common import Scaler
from scaler.config import ScalerConfig
from scaler.metrics import ScalerMetrics
from scaler.reader import StreamReader
from scaler.server import ScalerServer
from tests.keda import FakeSidecar, KedaClient
from token_scaler.redis_conn import LocalRedis


@pytest.fixture
def processes(redis_url: str) -> Iterator[list[Scaler]]:
    started = [Scaler(redis_url, capture=True), Scaler(redis_url, capture=True)]
    yield started
    for p in started:
        p.stop()


def test_two_scaler_replicas_give_the_same_answer(
    processes: list[Scaler], redis_url: str, workload: str
) -> None:
    client = redis.Redis.from_url(redis_url)
    sidecars = [FakeSidecar(client, workload, f"pod-{i}") for i in range(3)]
    now = sidecars[0].now_ms()
    import random

    rng = random.Random(7)
    for sec in range(120, 0, -1):  # a varied history, with a burst for the panic logic
        for sc in sidecars:
            burst = 8 if 20 < sec < 26 else 1
            sc.flush(now - sec * 1000, sp=rng.randrange(0, 400) * burst, sg=rng.randrange(0, 900) * burst)
    stop = threading.Event()

    def keep_flushing() -> None:
        while not stop.is_set():
            for sc in sidecars:
                sc.flush(sp=rng.randrange(0, 400), sg=rng.randrange(0, 900))
            stop.wait(0.3)

    flusher = threading.Thread(target=keep_flushing)
    flusher.start()
    ns, name = workload.split("/")
    metadata = {"tokensPerSecondPerReplica": "300", "windowSeconds": "30"}

    async def ask(p: Scaler) -> float:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{p.grpc_port}") as channel:
            return (await KedaClient(channel, "scaler:9090").poll(ns, name, metadata)).value

    try:
        compared = 0
        for _ in range(40):
            values = [asyncio.run(ask(p)) for p in processes]
            views = [p.debug(workload)["evaluation"] for p in processes]
            # Each replica answers for the last complete second; compare those that agree on it.
            if views[0]["second"] == views[1]["second"]:
                assert views[0] == views[1]
                compared += 1
            assert all(v > 0 for v in values)
            if compared >= 3:
                break
        assert compared >= 3
    finally:
        stop.set()
        flusher.join()
        client.close()


def test_redis_outage_turns_unavailable_then_recovers(own_redis: LocalRedis, workload: str) -> None:
    async def scenario() -> None:
        server = ScalerServer(
            ScalerConfig(
                grpc_port=0, http_port=0, host="127.0.0.1", redis_url=own_redis.url, stale_after_s=1.0
            )
        )
        await server.start()
        ns, name = workload.split("/")
        meta = {"tokensPerSecondPerReplica": "100"}
        client = redis.Redis.from_url(own_redis.url)
        sidecar = FakeSidecar(client, workload, "pod-a")
        now = sidecar.now_ms()
        for i in range(30, 0, -1):
            sidecar.flush(now - i * 1000 + 1000, sg=100)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            keda = KedaClient(channel, "scaler:9090")
            assert (await keda.poll(ns, name, meta)).value == pytest.approx(100, rel=0.05)

            own_redis.process.terminate()
            own_redis.process.wait()
            await asyncio.sleep(1.6)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await keda.poll(ns, name, meta)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "stale" in (info.value.details() or "")
            health = health_pb2_grpc.HealthStub(channel)
            for _ in range(20):  # the health watcher looks every 0.5 s
                readiness = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=3)
                if readiness.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    break
                await asyncio.sleep(0.1)
            assert readiness.status == health_pb2.HealthCheckResponse.NOT_SERVING
            liveness = await health.Check(health_pb2.HealthCheckRequest(service="liveness"), timeout=3)
            assert liveness.status == health_pb2.HealthCheckResponse.SERVING

            # Redis comes back empty (it keeps nothing on disk): the scaler keeps what it read,
            # and reads what sidecars write from now on.
            restarted = LocalRedis.start(port=own_redis.port)
            own_redis.process = restarted.process
            client = redis.Redis.from_url(own_redis.url)
            sidecar = FakeSidecar(client, workload, "pod-b")
            for _ in range(60):
                try:
                    answer = await keda.poll(ns, name, meta)
                    break
                except grpc.aio.AioRpcError:
                    await asyncio.sleep(0.2)
            else:
                raise AssertionError("the scaler did not recover")
            watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
            async for reply in watch:
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    watch.cancel()
                    break
            for _ in range(3):
                sidecar.flush(sg=3000)
                await asyncio.sleep(1)
            answer = await keda.poll(ns, name, meta)
            assert answer.value > 150  # the new entries count, the old ones are still there
            shutil.rmtree(restarted.workdir, ignore_errors=True)
        client.close()
        await server.stop()

    asyncio.run(scenario())


def test_the_first_good_read_after_stale_data_wakes_the_health_service() -> None:
    """The gRPC health service is set from the reader's ``revived`` event, so it turns
    SERVING with the read that turns /readyz 200, not up to a watch period later."""

    async def scenario() -> None:
        reader = StreamReader(client=None, metrics=ScalerMetrics(), stale_after_s=10)
        never_read = reader.revived()
        reader._mark_ok()
        assert never_read.is_set()
        fresh = reader.revived()
        assert fresh is not never_read
        reader._mark_ok()
        assert not fresh.is_set()  # already fresh: nothing to wake
        reader._last_ok -= 11  # stale now
        reader._mark_ok()
        assert fresh.is_set()

    asyncio.run(scenario())


@pytest.mark.parametrize("mutual", [False, True])
def test_tls(certs: Path, redis_url: str, workload: str, mutual: bool) -> None:
    extra = ["--tls-cert", str(certs / "server.crt"), "--tls-key", str(certs / "server.key")]
    if mutual:
        extra += ["--client-ca", str(certs / "ca.crt")]
    proc = Scaler(redis_url, *extra, capture=True)
    ns, name = workload.split("/")
    ca = (certs / "ca.crt").read_bytes()
    with_cert = grpc.ssl_channel_credentials(
        ca, (certs / "client.key").read_bytes(), (certs / "client.crt").read_bytes()
    )
    without_cert = grpc.ssl_channel_credentials(ca)

    async def ask(credentials: grpc.ChannelCredentials) -> float:
        async with grpc.aio.secure_channel(f"127.0.0.1:{proc.grpc_port}", credentials) as channel:
            answer = await KedaClient(channel, "scaler:9090").poll(
                ns, name, {"tokensPerSecondPerReplica": "1"}
            )
            return answer.value

    async def plaintext() -> None:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{proc.grpc_port}") as channel:
            await KedaClient(channel, "scaler:9090").poll(ns, name, {"tokensPerSecondPerReplica": "1"})

    try:
        assert asyncio.run(ask(with_cert)) == 0
        if mutual:
            with pytest.raises(grpc.aio.AioRpcError):
                asyncio.run(ask(without_cert))
        else:
            assert asyncio.run(ask(without_cert)) == 0
        with pytest.raises(grpc.aio.AioRpcError):
            asyncio.run(plaintext())
    finally:
        assert proc.stop() == 0


def test_sigterm_ends_streams_cleanly_and_exits_zero(redis_url: str, workload: str) -> None:
    proc = Scaler(redis_url, "--shutdown-grace", "5", capture=True)
    ns, name = workload.split("/")

    async def scenario() -> grpc.StatusCode:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{proc.grpc_port}") as channel:
            keda = KedaClient(channel, "scaler:9090")
            call = keda.stub.StreamIsActive(keda.ref(ns, name, {"tokensPerSecondPerReplica": "1"}))
            await asyncio.sleep(1.0)
            os.kill(proc.proc.pid, signal.SIGTERM)
            async for _ in call:
                pass
            return await call.code()

    assert asyncio.run(scenario()) == grpc.StatusCode.OK
    # It exits by itself: proc.stop() would send a second SIGTERM, which can land after the
    # event loop closed (its handlers gone) and kill the process mid-teardown.
    assert proc.proc.wait(timeout=15) == 0


def test_bad_config_names_the_variable(redis_url: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "token_scaler.cli", "serve"],
        env={**os.environ, "TOKEN_SCALER_GRPC_PORT": "ninety"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "TOKEN_SCALER_GRPC_PORT='ninety' is invalid" in result.stderr
