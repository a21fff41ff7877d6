"""Redis outages: the proxy keeps serving, records wait in order, nothing is lost or doubled."""

from __future__ import annotations

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from sidecar.flush import Flusher
from sidecar.meter import Meter
from sidecar.metrics import Metrics
from tests.sidecar.conftest import StartSidecar, read_records, totals
from tests.sidecar.fake_upstream import FakeUpstream
from token_scaler.redis_conn import LocalRedis, connect, free_port


def make_flusher(url: str, workload: str, **kwargs: object) -> tuple[Flusher, Meter, Metrics]:
    meter = Meter()
    metrics = Metrics(CollectorRegistry())
    client = connect(url, timeout_s=0.5)
    flusher = Flusher(client, meter, metrics, workload=workload, sidecar_id="sc-1", **kwargs)
    return flusher, meter, metrics


async def test_outage_and_recovery_lose_nothing(
    start_sidecar: StartSidecar, upstream: FakeUpstream, own_redis: LocalRedis, workload: str
) -> None:
    sidecar = await start_sidecar(redis_url=own_redis.url)
    url = f"http://127.0.0.1:{sidecar.port}/v1/chat/completions"

    async def traffic(session: aiohttp.ClientSession, stream: bool) -> None:
        body = {"model": "m", "messages": [{"content": "hello"}], "max_tokens": 6, "stream": stream}
        async with session.post(url, json=body) as response:
            assert response.status == 200
            await response.read()

    async with aiohttp.ClientSession() as session:
        await traffic(session, False)
        sidecar.flusher.tick()
        assert await sidecar.flusher.deliver()
        own_redis.process.terminate()
        own_redis.process.wait()
        for i in range(6):
            await traffic(session, i % 2 == 0)
            sidecar.flusher.cut()
            assert not await sidecar.flusher.deliver()
        assert sidecar.flusher.buffered == 6
        stamps = [p.record.ts_ms for p in sidecar.flusher.outbox.buffer]
        back = LocalRedis.start(port=own_redis.port)
        try:
            await traffic(session, True)
            sidecar.flusher.cut()
            assert await sidecar.flusher.deliver()
            records = read_records(back.url, workload)
        finally:
            back.stop()
    # Redis came back empty (no persistence): the first record, delivered before and lost with
    # it, is sent again ahead of the buffered ones.
    assert [r.seq - sidecar.flusher.first_seq for r in records] == [0, 1, 2, 3, 4, 5, 6, 7]
    assert [r.ts_ms for r in records[1:7]] == stamps
    got = totals(records)
    assert got["rq"] == 8 and got["sg"] == got["ag"] == 8 * 6
    assert sidecar.flusher.outbox.resent == 1
    assert sidecar.registry.get_sample_value("tokenscaler_flush_errors_total") == 6
    assert sidecar.registry.get_sample_value("tokenscaler_flush_dropped_records_total") == 0


async def test_a_retried_batch_is_not_counted_twice(redis_url: str, workload: str) -> None:
    flusher, meter, metrics = make_flusher(redis_url, workload)
    meter.finish(meter.arrive("m", "t", 10, 5), 10, 5)
    for _ in range(3):
        flusher.cut()
    sent = list(flusher.outbox.buffer)
    assert await flusher.deliver()
    flusher.outbox.buffer.extend(sent)  # as if the reply to that append had been lost
    flusher.cut()
    assert await flusher.deliver()
    records = read_records(redis_url, workload)
    assert [r.seq - flusher.first_seq for r in records] == [0, 1, 2, 3]
    assert totals(records)["sp"] == 10
    assert metrics.registry.get_sample_value("tokenscaler_flush_records_total", {"result": "duplicate"}) == 3
    await flusher.outbox.client.aclose()


async def test_a_restarted_process_with_the_same_id_is_not_skipped(redis_url: str, workload: str) -> None:
    """A fixed sidecar id survives a restart: the new process numbers above the old one."""
    import time

    start = time.time()
    old, old_meter, _ = make_flusher(redis_url, workload, clock=lambda: start)
    for _ in range(5):  # five records, as a process that ran five intervals
        old_meter.finish(old_meter.arrive("m", "t", 10, 5), 10, 5)
        old.cut()
    assert await old.deliver()
    await old.outbox.client.aclose()
    # The next process of that pod, a second later (records at 1 ms intervals would not reach it)
    new, new_meter, metrics = make_flusher(redis_url, workload, clock=lambda: start + 1)
    new_meter.finish(new_meter.arrive("m", "t", 10, 5), 10, 5)
    new.cut()
    assert await new.deliver()
    records = read_records(redis_url, workload)
    assert len(records) == 6 and totals(records)["sp"] == 60
    assert records[-1].seq > records[-2].seq
    assert metrics.registry.get_sample_value("tokenscaler_flush_records_total", {"result": "added"}) == 1
    await new.outbox.client.aclose()


async def test_buffer_is_bounded_and_drops_are_counted(workload: str) -> None:
    flusher, _, metrics = make_flusher(f"redis://127.0.0.1:{free_port()}/0", workload, buffer_records=5)
    for _ in range(8):
        flusher.cut()
        assert not await flusher.deliver()
    assert [p.record.seq - flusher.first_seq for p in flusher.outbox.buffer] == [3, 4, 5, 6, 7]
    assert metrics.registry.get_sample_value("tokenscaler_flush_dropped_records_total") == 3
    assert metrics.registry.get_sample_value("tokenscaler_flush_buffered_records") == 5
    await flusher.outbox.client.aclose()


@pytest.mark.parametrize("skew_s", [-30.0, 45.0])
async def test_records_are_stamped_on_the_redis_clock(redis_url: str, workload: str, skew_s: float) -> None:
    """A sidecar whose clock is off stamps its records with Redis' time all the same."""
    import time

    flusher, _, _ = make_flusher(redis_url, workload, clock=lambda: time.time() + skew_s)
    unstamped = flusher.cut()  # before any contact with Redis: no offset yet
    assert await flusher.deliver()
    assert flusher.offset_ms is not None and abs(flusher.offset_ms + skew_s * 1000) < 2000
    stamped = flusher.cut()
    assert await flusher.deliver()
    records = read_records(redis_url, workload)
    for record in (unstamped, stamped):
        assert abs(record.ts_ms - time.time() * 1000) < 5000
    assert [r.ts_ms for r in records] == [unstamped.ts_ms, stamped.ts_ms]
    await flusher.outbox.client.aclose()


async def test_the_flush_loop_writes_one_record_per_interval(
    start_sidecar: StartSidecar, redis_url: str, workload: str
) -> None:
    import asyncio

    sidecar = await start_sidecar(flush_interval_s=0.05)
    for _ in range(400):
        records = read_records(redis_url, workload)
        if len(records) >= 3:
            break
        await asyncio.sleep(0.01)
    assert len(records) >= 3
    first = sidecar.flusher.first_seq
    assert [r.seq for r in records] == list(range(first, first + len(records)))
    assert all(r.sidecar == sidecar.flusher.sidecar_id and r.models == {} for r in records)
    assert all(r.interval_ms > 0 for r in records)
