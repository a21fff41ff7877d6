"""Writes the meter's counts to the workload's Redis stream, one record per interval.

Off the request path: a tick cuts a record from the meter every ``interval_s`` and puts
it in a bounded buffer; a delivery task sends what is buffered, oldest first, through
``record.APPEND_SCRIPT``. While Redis is away the buffer fills (dropping the oldest past
its bound, counted in a metric) and the proxy keeps serving; when Redis is back the
records go out in order with their original ``seq`` and ``ts``. A batch whose reply was
lost is sent again as it was: the script skips every ``seq`` it already stored.

Time: ``ts`` is the local clock plus the offset to the Redis clock learnt from each
reply's Redis time. A record cut before any offset is known (Redis down since start-up)
gets its ``ts`` from the first offset learnt, before it is first sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from sidecar.meter import Meter
from sidecar.metrics import Metrics
from token_scaler.errors import RecordError
from token_scaler.record import (
    APPEND_SCRIPT,
    Record,
    ServerGauges,
    append_args,
    decode,
    seq_key,
    stream_key,
)
from token_scaler.redis_conn import REDIS_ERRORS

log = logging.getLogger(__name__)

# Records per script call: bounds one call's size after an outage.
BATCH = 100


@dataclass(slots=True)
class _Pending:
    record: Record
    local_ms: int
    stamped: bool


class Flusher:
    def __init__(
        self,
        client: aioredis.Redis,
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
        self._client = client
        self._meter = meter
        self._metrics = metrics
        self._keys = [stream_key(workload), seq_key(workload, sidecar_id)]
        self._script = client.register_script(APPEND_SCRIPT)
        self.sidecar_id = sidecar_id
        self._interval_s = interval_s
        self._retention_s = retention_s
        self._clock = clock
        self._monotonic = monotonic
        self._buffer: deque[_Pending] = deque()
        self._limit = buffer_records
        # A process that reuses its predecessor's sidecar id (a fixed --sidecar-id) must not
        # start below the seqs that one stored: the append script, and the scaler, would skip
        # its records until it passed them. The wall clock in milliseconds at start-up is
        # above any seq an earlier process reached at a record per interval of 1 ms or more
        # (unless the clock stepped back further than that process lived), and is exact in
        # Redis' Lua numbers (14 significant digits).
        self.first_seq = round(clock() * 1000) + 1
        self._seq = self.first_seq - 1
        self._offset_ms: int | None = None
        self._last_cut = monotonic()
        self._delivery: asyncio.Task[bool] | None = None
        self._lock = asyncio.Lock()
        self._failing = False
        self.last_success: float | None = None  # monotonic time of the last delivery

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    @property
    def offset_ms(self) -> int | None:
        return self._offset_ms

    def cut(self) -> Record:
        """Close the current interval: one record of the meter's counts, buffered."""
        now = self._monotonic()
        interval_ms = max(1, round((now - self._last_cut) * 1000))
        self._last_cut = now
        snapshot = self._meter.take()
        self._metrics.observe_interval(snapshot, interval_ms / 1000)
        self._seq += 1
        local_ms = round(self._clock() * 1000)
        stamped = self._offset_ms is not None
        record = Record(
            sidecar=self.sidecar_id,
            seq=self._seq,
            ts_ms=local_ms + (self._offset_ms or 0),
            interval_ms=interval_ms,
            models=snapshot.models,
            tenants=snapshot.tenants,
            server=self._server_gauges(),
        )
        if len(self._buffer) >= self._limit:
            self._buffer.popleft()
            self._metrics.flush_dropped.inc()
        self._buffer.append(_Pending(record, local_ms, stamped))
        self._metrics.flush_buffered.set(len(self._buffer))
        return record

    async def _learn_offset(self) -> None:
        before = self._clock()
        seconds, micros = await self._client.time()
        after = self._clock()
        self._offset_ms = seconds * 1000 + micros // 1000 - round((before + after) * 500)

    async def deliver(self) -> bool:
        """Send everything buffered, oldest first; False when Redis failed (kept for later)."""
        async with self._lock:
            try:
                if self._offset_ms is None:
                    await self._learn_offset()
                while self._buffer:
                    await self._send(list(self._take_batch()))
            except REDIS_ERRORS as exc:
                self._metrics.flush_errors.inc()
                if not self._failing:  # once per outage, not once a second
                    log.warning("Redis unreachable, buffering records: %s", exc)
                self._failing = True
                return False
            finally:
                self._metrics.flush_buffered.set(len(self._buffer))
            if self._failing:
                log.info("Redis reachable again; buffered records delivered")
                self._failing = False
            return True

    def _take_batch(self) -> list[_Pending]:
        batch: list[_Pending] = []
        for pending in self._buffer:
            if len(batch) >= BATCH:
                break
            if not pending.stamped and self._offset_ms is not None:
                pending.record.ts_ms = pending.local_ms + self._offset_ms
                pending.stamped = True
            batch.append(pending)
        return batch

    async def _send(self, batch: list[_Pending]) -> None:
        before = self._clock()
        reply = await self._script(
            keys=self._keys, args=append_args([p.record for p in batch], self._retention_s)
        )
        after = self._clock()
        added, _last_id, now_ms = int(reply[0]), reply[1], int(reply[2])
        self._offset_ms = now_ms - round((before + after) * 500)
        # Only the delivered ones leave: meanwhile cut() may have appended records, or
        # dropped the oldest of this very batch when the buffer was full.
        delivered = {id(p) for p in batch}
        while self._buffer and id(self._buffer[0]) in delivered:
            self._buffer.popleft()
        self._metrics.flush_records.labels("added").inc(added)
        self._metrics.flush_records.labels("duplicate").inc(len(batch) - added)
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
            log.warning("Redis did not take the last %d records before shutdown", len(self._buffer))
            return False


async def recent_generation_means(
    client: aioredis.Redis, workload: str, entries: int = 300, min_requests: int = 5
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
