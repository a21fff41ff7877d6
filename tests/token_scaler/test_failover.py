"""The whole loop on a Redis Cluster (3 masters, 3 replicas) and on Sentinel (1 master, 2
replicas, 3 sentinels), real ``redis-server`` processes on loopback, through a master's death.

Sidecars (in this process, their own flush loops) in front of a fake model server append to
their workloads' streams; a scaler (gRPC, polled as KEDA does) follows them. Then the master
holding the first workload's stream stops feeding its replicas (as a lagging replica would
not have the last writes: replication is asynchronous), takes more appends, and is killed. A
replica missing those appends is promoted. What is checked, after the traffic ends:

- the scaler answered only values or ``UNAVAILABLE`` (its data stale) throughout, and values
  again after the failover (printed: how often for the workloads on the other masters, which
  are read apart from the dead one's but wait with them while redis-py reads the map again);
- every workload's stream holds exactly the tokens the model servers generated, none lost and
  none twice (counting each sidecar's ``seq`` once), and so does the scaler's own series: the
  sidecar whose appends the failover lost sent them again (``Outbox.resent``).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
import pytest
import yaml

from scaler.config import ScalerConfig
from scaler.server import ScalerServer
from sidecar.server import Sidecar
from tests.keda import KedaClient
from tests.sidecar.conftest import started_sidecar
from tests.sidecar.fake_upstream import FakeUpstream
from tests.topologies import Topology, master_of, running
from token_scaler.record import decode, stream_key
from token_scaler.redis_conn import sync_client
from token_scaler.redis_topology import LocalCluster

pytestmark = pytest.mark.cluster

WORKLOADS = 3
STALE_AFTER_S = 1.0
# A replica's worth high enough that no burst of the test passes the scaler's per-sidecar
# ceiling (20 replicas' worth a second), which would scale the entry down.
TRIGGER = {"tokensPerSecondPerReplica": "100000", "headroom": "1"}
TENANT = "acme"


@pytest.fixture(params=["cluster", "sentinel"])
def topology(request: pytest.FixtureRequest) -> Iterator[Topology]:
    with running(request.param) as started:
        yield started


def stream_generation(url: str, workload: str) -> int:
    """Generated tokens in the stream, each sidecar's ``seq`` counted once."""
    client = sync_client(url)
    try:
        rows = client.xrange(stream_key(workload))
    finally:
        client.close()
    seen: set[tuple[str, int]] = set()
    total = 0
    for _id, fields in rows:
        record = decode(fields)
        if (record.sidecar, record.seq) in seen:
            continue
        seen.add((record.sidecar, record.seq))
        total += sum(c.served_generation for c in record.models.values())
    return total


def scaler_generation(scaler: ScalerServer, workload: str) -> int:
    series = scaler.reader.series[workload]
    ring = series.ring(None)
    if ring is None or series.first_sec is None:
        return 0
    last = scaler.reader.now_ms() // 1000 + 2
    return round(float(ring.window(series.first_sec, last)[1].sum()))


async def stop_all(scaler: ScalerServer, sidecars: list[Sidecar], upstreams: list[FakeUpstream]) -> None:
    await scaler.stop()
    for sidecar in sidecars:
        await sidecar.stop()
    for upstream in upstreams:
        await upstream.stop()


async def answers_of(keda: KedaClient, workloads: list[str]) -> dict[str, str]:
    """Each workload's answer to a KEDA poll: "OK", or the gRPC code and its details."""
    found = {}
    for workload in workloads:
        ns, name = workload.split("/")
        try:
            await keda.poll(ns, name, TRIGGER)
            found[workload] = "OK"
        except grpc.aio.AioRpcError as exc:
            found[workload] = f"{exc.code().name}: {exc.details()}"
    return found


async def traffic(session: aiohttp.ClientSession, sidecar: Sidecar, requests: int) -> None:
    url = f"http://127.0.0.1:{sidecar.port}/v1/chat/completions"
    for i in range(requests):
        body = {
            "model": "m",
            "messages": [{"content": "hello"}],
            "max_tokens": 5 + i % 7,
            "stream": i % 2 == 0,
        }
        async with session.post(url, json=body, headers={"X-Tenant-ID": TENANT}) as response:
            assert response.status == 200
            await response.read()


async def test_the_loop_survives_a_master_failover_and_counts_each_token_once(topology: Topology) -> None:
    url = topology.url
    workloads = [f"test-{uuid.uuid4().hex[:10]}/fo{i}" for i in range(WORKLOADS)]
    upstreams = [FakeUpstream() for _ in workloads]
    sidecars: list[Sidecar] = []
    scaler = ScalerServer(
        ScalerConfig(grpc_port=0, http_port=0, host="127.0.0.1", redis_url=url, stale_after_s=STALE_AFTER_S)
    )
    answers: dict[str, int] = {}
    unavailable: dict[str, int] = {}  # per workload
    try:
        for upstream in upstreams:
            await upstream.start()
        for i, (workload, upstream) in enumerate(zip(workloads, upstreams, strict=True)):
            sidecars.append(await started_sidecar(url, workload, upstream, f"fo-{i}", flush_interval_s=0.2))
        await scaler.start()
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{scaler.grpc_port}") as channel,
            aiohttp.ClientSession() as session,
        ):
            keda = KedaClient(channel, "scaler:9090")

            async def poll_all() -> list[str]:
                codes = []
                for workload, answer in (await answers_of(keda, workloads)).items():
                    code = answer.split(":")[0]
                    codes.append(code)
                    answers[code] = answers.get(code, 0) + 1
                    if code != "OK":
                        unavailable[workload] = unavailable.get(workload, 0) + 1
                        assert code == "UNAVAILABLE" and ("stale" in answer or "Redis" in answer), answer
                return codes

            assert await poll_all() == ["OK"] * WORKLOADS
            await asyncio.gather(*(traffic(session, s, 10) for s in sidecars))
            for sidecar in sidecars:
                sidecar.flusher.cut()
                assert await sidecar.flusher.deliver()

            doomed = master_of(topology, stream_key(workloads[0]))
            elsewhere = [w for w in workloads if master_of(topology, stream_key(w)) is not doomed]
            doomed.cut_replicas()
            await traffic(session, sidecars[0], 6)
            sidecars[0].flusher.cut()
            assert await sidecars[0].flusher.deliver()  # stored on the doomed master alone
            doomed.kill()

            # Traffic and KEDA's polls go on through the failover.
            failover = asyncio.get_running_loop().run_in_executor(None, topology.wait_failover, doomed)
            while not failover.done():
                await asyncio.gather(*(traffic(session, s, 2) for s in sidecars))
                await poll_all()
                await asyncio.sleep(0.2)
            await failover
            await asyncio.gather(*(traffic(session, s, 10) for s in sidecars))
            for sidecar in sidecars:
                for _ in range(100):  # each flush loop delivers what it buffered (0.2 s each)
                    if sidecar.flusher.buffered == 0:
                        break
                    await asyncio.sleep(0.1)
                sidecar.flusher.cut()
                assert await sidecar.flusher.deliver()

            expected = [upstream.reported.generation for upstream in upstreams]
            for _ in range(100):
                codes = await poll_all()
                if (
                    codes == ["OK"] * WORKLOADS
                    and [scaler_generation(scaler, w) for w in workloads] == expected
                ):
                    break
                await asyncio.sleep(0.1)
            assert codes == ["OK"] * WORKLOADS
            resent = sidecars[0].flusher.outbox.resent
            print(
                f"\nscaler answers through the failover: {answers}; records sent again: {resent}; "
                f"UNAVAILABLE for the dead master's workload {unavailable.get(workloads[0], 0)}, "
                f"for the others' {[unavailable.get(w, 0) for w in elsewhere]}"
            )
            assert resent >= 1  # appends the failover lost, sent again
            assert [stream_generation(url, w) for w in workloads] == expected
            assert [scaler_generation(scaler, w) for w in workloads] == expected
    finally:
        await stop_all(scaler, sidecars, upstreams)


def budget_of(url: str, scope: str) -> tuple[int, int]:
    """The tenant's budget used today, and what its open reservations hold of it (a chunk
    reserved ahead holds its unused part: the first field)."""
    client = sync_client(url)
    try:
        base = f"tokenscaler:v1:{{policy:{scope}:{TENANT}}}"
        charged = sum(int(client.get(k) or 0) for k in client.scan_iter(match=f"{base}:budget:d:*"))
        reserved: list[bytes] = client.hvals(f"{base}:res")  # type: ignore[assignment]  # sync client
        return charged, sum(int(value.split(b":")[0]) for value in reserved)
    finally:
        client.close()


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    with running("cluster") as started:
        assert isinstance(started, LocalCluster)
        yield started


@dataclass
class Loop:
    """Sidecars of a budgeted scope in front of fake model servers, and a scaler, on ``url``."""

    url: str
    scope: str
    workloads: list[str]
    upstreams: list[FakeUpstream]
    sidecars: list[Sidecar]
    scaler: ScalerServer


@contextlib.asynccontextmanager
async def budgeted_loop(url: str, scope: str, workloads: int, policy: Path) -> AsyncIterator[Loop]:
    """``workloads`` workloads of ``scope``, a sidecar each with a large daily budget, and a
    scaler; all stopped at the end."""
    rules = yaml.safe_dump({"scope": scope, "defaults": {"budget": {"daily": 10_000_000}}})
    await asyncio.to_thread(policy.write_text, rules)
    names = [f"{scope}/w{i}" for i in range(workloads)]
    config = ScalerConfig(
        grpc_port=0, http_port=0, host="127.0.0.1", redis_url=url, stale_after_s=STALE_AFTER_S
    )
    loop = Loop(
        url,
        scope,
        names,
        [FakeUpstream() for _ in names],
        [],
        ScalerServer(config),
    )
    try:
        for upstream in loop.upstreams:
            await upstream.start()
        for i, (workload, upstream) in enumerate(zip(names, loop.upstreams, strict=True)):
            loop.sidecars.append(
                await started_sidecar(
                    url, workload, upstream, f"{scope}-{i}", flush_interval_s=0.2, policy=policy
                )
            )
        await loop.scaler.start()
        yield loop
    finally:
        await stop_all(loop.scaler, loop.sidecars, loop.upstreams)


async def delivered_and_settled(sidecars: list[Sidecar]) -> None:
    """Every sidecar's records in Redis and its settlements sent."""
    for sidecar in sidecars:
        sidecar.flusher.cut()
        assert await sidecar.flusher.deliver()
        assert sidecar.policy is not None
        for _ in range(200):
            if not sidecar.policy.settling:
                break
            await asyncio.sleep(0.01)


async def assert_exact(loop: Loop) -> None:
    """The streams, the scaler's series and the budget hold exactly what was served."""
    expected = [upstream.reported.generation for upstream in loop.upstreams]
    assert all(expected)
    for _ in range(100):
        if [scaler_generation(loop.scaler, w) for w in loop.workloads] == expected:
            break
        await asyncio.sleep(0.1)
    assert [stream_generation(loop.url, w) for w in loop.workloads] == expected
    assert [scaler_generation(loop.scaler, w) for w in loop.workloads] == expected
    served = sum(u.reported.prompt + u.reported.generation for u in loop.upstreams)
    for _ in range(100):  # chunks reserved ahead report their usage at checkpoints
        charged, held = budget_of(loop.url, loop.scope)
        if charged - held == served:
            break
        await asyncio.sleep(0.1)
    assert charged - held == served


async def test_the_loop_and_a_budget_through_slot_migrations(cluster: LocalCluster, tmp_path: Path) -> None:
    """The slots of a workload's stream and of a tenant's budget move to another master, a key
    at a time, while sidecars append, the scaler reads and requests are admitted and settled:
    clients meet ASK while a slot is half moved and MOVED after. The scaler answers values
    throughout; streams, the scaler's series and the budget hold exactly what was served."""
    scope = f"mig-{uuid.uuid4().hex[:8]}"
    codes: list[str] = []
    async with (
        budgeted_loop(cluster.url, scope, 2, tmp_path / "policy.yaml") as loop,
        grpc.aio.insecure_channel(f"127.0.0.1:{loop.scaler.grpc_port}") as channel,
        aiohttp.ClientSession() as session,
    ):
        keda = KedaClient(channel, "scaler:9090")
        sidecars, workloads = loop.sidecars, loop.workloads

        async def poll_all() -> None:
            codes.extend((await answers_of(keda, workloads)).values())

        await poll_all()
        await asyncio.gather(*(traffic(session, s, 10) for s in sidecars))
        for sidecar in sidecars:  # the stream exists before its slot moves
            sidecar.flusher.cut()
            assert await sidecar.flusher.deliver()
        budget_key = f"tokenscaler:v1:{{policy:{scope}:{TENANT}}}:res"
        running_loop = asyncio.get_running_loop()
        for key in (stream_key(workloads[0]), budget_key):
            source = cluster.master_of(key)
            target = next(node for node in cluster.masters() if node is not source)
            migration = running_loop.run_in_executor(None, cluster.migrate, key, target, 0.1)
            while not migration.done():
                await asyncio.gather(*(traffic(session, s, 2) for s in sidecars))
                await poll_all()
            assert await migration > 0
            assert cluster.master_of(key) is target
        await asyncio.gather(*(traffic(session, s, 10) for s in sidecars))
        await delivered_and_settled(sidecars)
        await assert_exact(loop)
        await poll_all()
        assert [c for c in codes if c != "OK"] == []
