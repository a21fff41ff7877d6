"""Writes the meter's counts to the workload's Redis stream, one record per interval.

Off the request path: a tick cuts a record from the meter every ``interval_s`` and puts
it in the bounded buffer of ``token_scaler/outbox.py``; a delivery task sends what is
buffered, oldest first. While Redis is away the buffer fills (dropping the oldest past
its bound, counted in a metric) and the proxy keeps serving; the outbox says how the
records go out when Redis is back, and how their ``ts`` lands on Redis' clock (a record
cut before any offset is known, Redis down since start-up, is stamped when first sent).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from sidecar.meter import Meter
from sidecar.metrics import Metrics
from token_scaler.errors import RecordError
from token_scaler.outbox import Outbox
from token_scaler.record import Record, ServerGauges, decode, stream_key
from token_scaler.redis_conn import Client

log = logging.getLogger(__name__)


class Flusher:
    def __init__(
        self,
        client: Client,
        meter: Meter,
        metrics: Metrics,
        *,
        workload: str,
        sidecar_id: str,
        interval_s: float = 1.0,
        buffer_records: int = 900,
        retention_s: int = 1200,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        server_gauges: Callable[[], ServerGauges | None] = lambda: None,
    ) -> None:
        self._server_gauges = server_gauges
        self._meter = meter
        self._metrics = metrics
        self.outbox = Outbox(
            client,
            workload=workload,
            writer_id=sidecar_id,
            retention_s=retention_s,
            limit=buffer_records,
            clock=clock,
        )
        self.sidecar_id = sidecar_id
        self._interval_s = interval_s
        self._clock = clock
        self._monotonic = monotonic
        # A process that reuses its predecessor's sidecar id (a fixed --sidecar-id) must not
        # start below the seqs that one stored: the append script, and the scaler, would skip
        # its records until it passed them. The wall clock in milliseconds at start-up is
        # above any seq an earlier process reached at a record per interval of 1 ms or more
        # (unless the clock stepped back further than that process lived), and is exact in
        # Redis' Lua numbers (14 significant digits).
        self.first_seq = round(clock() * 1000) + 1
        self._seq = self.first_seq - 1
        self._last_cut = monotonic()
        self._delivery: asyncio.Task[bool] | None = None
        self.last_success: float | None = None  # monotonic time of the last delivery

    @property
    def buffered(self) -> int:
        return len(self.outbox.buffer)

    @property
    def offset_ms(self) -> int | None:
        return self.outbox.offset_ms

    def cut(self) -> Record:
        """Close the current interval: one record of the meter's counts, buffered."""
        now = self._monotonic()
        interval_ms = max(1, round((now - self._last_cut) * 1000))
        self._last_cut = now
        snapshot = self._meter.take()
        self._metrics.observe_interval(snapshot, interval_ms / 1000)
        self._seq += 1
        local_ms = self.outbox.local_ms()
        offset = self.outbox.offset_ms
        record = Record(
            sidecar=self.sidecar_id,
            seq=self._seq,
            ts_ms=local_ms + (offset or 0),
            interval_ms=interval_ms,
            models=snapshot.models,
            tenants=snapshot.tenants,
            server=self._server_gauges(),
        )
        if self.outbox.add(record, local_ms, stamped=offset is not None):
            self._metrics.flush_dropped.inc()
        self._metrics.flush_buffered.set(self.buffered)
        return record

    async def deliver(self) -> bool:
        """Send everything buffered, oldest first; False when Redis failed (kept for later)."""
        try:
            delivered = await self.outbox.deliver(learn_first=True, sent=self._sent)
        finally:
            self._metrics.flush_buffered.set(self.buffered)
        if not delivered:
            self._metrics.flush_errors.inc()
        return delivered

    def _sent(self, added: int, batch: int) -> None:
        self._metrics.flush_records.labels("added").inc(added)
        self._metrics.flush_records.labels("duplicate").inc(batch - added)
        self.last_success = self._monotonic()

    def tick(self) -> None:
        """Cut a record and start delivery unless a delivery is still under way."""
        self.cut()
        if self._delivery is None or self._delivery.done():
            self._delivery = asyncio.create_task(self.deliver())

    async def run(self) -> None:
        """Tick every interval on a fixed schedule, until cancelled."""
        next_at = self._monotonic() + self._interval_s
        while True:
            await asyncio.sleep(max(0.0, next_at - self._monotonic()))
            next_at += self._interval_s
            if next_at < self._monotonic():  # the loop stalled: skip, do not burst
                next_at = self._monotonic() + self._interval_s
            self.tick()

    async def close(self, timeout_s: float) -> bool:
        """Cut the last (partial) interval and try to deliver everything within the timeout."""
        if self._delivery is not None and not self._delivery.done():
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._delivery), timeout_s)
        self.cut()
        try:
            return await asyncio.wait_for(self.deliver(), timeout_s)
        except TimeoutError:
            log.warning("Redis did not take the last %d records before shutdown", self.buffered)
            return False


async def recent_generation_means(
    client: Client, workload: str, entries: int = 300, min_requests: int = 5
) -> dict[str, float]:
    """Generated tokens per ended request, per model, over the workload's newest stream
    entries (all its sidecars): the seed of a new sidecar's estimates. Entries that do not
    decode are skipped; models with fewer than ``min_requests`` ended requests are left out."""
    rows: Any = await client.xrevrange(stream_key(workload), count=entries)
    generated: dict[str, int] = {}
    ended: dict[str, int] = {}
    for _entry_id, fields in rows:
        try:
            record = decode(fields)
        except RecordError:
            continue
        for model, counts in record.models.items():
            generated[model] = generated.get(model, 0) + counts.served_generation
            ended[model] = ended.get(model, 0) + counts.requests
    return {m: max(0, generated[m]) / ended[m] for m in ended if ended[m] >= min_requests}
