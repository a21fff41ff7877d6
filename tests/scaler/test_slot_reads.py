"""The scaler's per-slot reads of a Redis Cluster (scaler/slot_reads.py) against a real
3-master cluster: a master that hangs (SIGSTOP: no reset, no answer) holds up only its own
workloads' streams, which turn stale alone, and everything appended to them meanwhile is read
once it answers again, none twice."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from scaler.metrics import ScalerMetrics
from scaler.reader import RedisUnavailable, StreamReader
from scaler.slot_reads import SlotReads
from tests.topologies import running
from token_scaler.record import APPEND_SCRIPT, ModelCounts, Record, append_args, seq_key, stream_key
from token_scaler.redis_conn import connect, locate
from token_scaler.redis_routing import ClusterChannel
from token_scaler.redis_topology import LocalCluster, Node

pytestmark = pytest.mark.cluster

STALE_AFTER_S = 1.5
# a round waits this long for every slot's read: long enough for a loaded machine's masters
WAIT_S = 0.5


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    # failure detection far beyond the test's hang, so the stopped master is not failed over
    with running("cluster", node_timeout_ms=60_000) as started:
        assert isinstance(started, LocalCluster)
        yield started


def workloads_on_each_master(cluster: LocalCluster) -> list[str]:
    """One workload whose stream lives on each master, in the masters' order."""
    found: dict[int, str] = {}
    for i in range(200):
        workload = f"ns/w{i}"
        found.setdefault(cluster.master_of(stream_key(workload)).port, workload)
        if len(found) == 3:
            break
    return list(found.values())


def append(master: Node, workload: str, seq: int, generation: int) -> None:
    """One record through the append script, sent straight to the master of the stream's slot
    (a cluster client would first ask a node for the map, maybe the hung one)."""
    client = master.client(timeout_s=5.0)
    try:
        record = Record(
            "pod-a", seq, int(time.time() * 1000), 1000, {"m": ModelCounts(1, generation, 1, generation, 1)}
        )
        client.eval(
            APPEND_SCRIPT, 2, stream_key(workload), seq_key(workload, "pod-a"), *append_args([record], 600)
        )
    finally:
        client.close()


def generation(reader: StreamReader, workload: str) -> int:
    series = reader.series[workload]
    ring = series.ring(None)
    if ring is None or series.first_sec is None:
        return 0
    return round(float(ring.window(series.first_sec, reader.now_ms() // 1000 + 2)[1].sum()))


async def first_reads(reader: StreamReader, everyone: list[str]) -> None:
    """Poll until every stream's first entry is read: the first rounds also open a connection
    to each master, which a loaded machine may not finish within one round's wait."""
    deadline = time.monotonic() + 10
    while True:
        try:
            await reader.poll_once()
        except RedisConnectionError:
            if time.monotonic() > deadline:
                raise
        if all(generation(reader, w) > 0 for w in everyone) or time.monotonic() > deadline:
            return


async def test_a_hung_master_holds_up_only_its_own_streams(cluster: LocalCluster) -> None:
    url = cluster.url
    hung, *others = workloads_on_each_master(cluster)
    everyone = [hung, *others]
    masters = {workload: cluster.master_of(stream_key(workload)) for workload in everyone}
    for workload in everyone:
        append(masters[workload], workload, 1, 10)
    reader = StreamReader(
        connect(url),
        ScalerMetrics(),
        stale_after_s=STALE_AFTER_S,
        slots=SlotReads(ClusterChannel(locate(url)), batch=100, wait_s=WAIT_S),
        poll_ms=50,
    )
    stopped = masters[hung]
    try:
        for workload in everyone:
            await reader.ensure(workload)
        await first_reads(reader, everyone)
        assert {w: generation(reader, w) for w in everyone} == dict.fromkeys(everyone, 10)

        os.kill(stopped.process.pid, signal.SIGSTOP)
        try:
            for workload in others:
                append(masters[workload], workload, 2, 5)
            deadline = time.monotonic() + STALE_AFTER_S + 2
            while time.monotonic() < deadline:
                await reader.poll_once()  # the other masters answer: no round raises
            for workload in others:
                reader.check_fresh(workload)
                assert generation(reader, workload) == 15
            with pytest.raises(RedisUnavailable, match="Redis Cluster master not read"):
                reader.check_fresh(hung)
        finally:
            os.kill(stopped.process.pid, signal.SIGCONT)

        append(masters[hung], hung, 2, 7)  # queued behind the hang's reads, read after them
        deadline = time.monotonic() + 10
        while generation(reader, hung) < 17 and time.monotonic() < deadline:
            await reader.poll_once()
        reader.check_fresh(hung)
        assert {w: generation(reader, w) for w in everyone} == {hung: 17, **dict.fromkeys(others, 15)}
    finally:
        if reader.slots is not None:
            await reader.slots.close()
        await reader.client.aclose()
