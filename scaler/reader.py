"""The only code that reads the workload streams.

One task per scaler process: for every workload some ScaledObject asked about, it
backfills the stream once (XRANGE), then follows all of them with one blocking
XREAD. On a Redis Cluster, where one command reads keys of one slot only, it follows
them with one non-blocking XREAD per slot, a round every ``poll_ms`` (``scaler/slot_reads.py``):
a master that fails or hangs holds up only its own streams, and only they turn stale.
Entries go into each workload's ``WorkloadSeries``; entries that break the
record contract are skipped, counted and logged once per stream. It also keeps the
offset between this host's clock and Redis' (``TIME``), because every window is on
Redis' clock, and the time of the last successful read, which says whether the data
can be trusted.

After a failed read (a failover, among others) every stream is read again from
``REWIND_MS`` before the last entry read: a master promoted after a failover may lack
entries the old one had stored (replication is asynchronous), and the entries its writers
append again can land at IDs below the last one read when the hosts' clocks differ. Entries
read twice are skipped by their sidecar's ``seq`` (``WorkloadSeries.add``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError

from scaler.ceiling import IngestCeiling
from scaler.metrics import ScalerMetrics
from scaler.series import WorkloadSeries
from scaler.slot_reads import SlotReads
from token_scaler.errors import RecordError
from token_scaler.record import decode, stream_key
from token_scaler.redis_conn import REDIS_ERRORS, Client

log = logging.getLogger("token_scaler.scaler.reader")

BACKFILL_PAGE = 2000
# How far back every stream is read again after a failed read (see the module's docstring).
REWIND_MS = 5000
CLOCK_TIMEOUT_S = 0.5  # for TIME, once the clock has been read
_CLOCK_ERRORS: tuple[type[BaseException], ...] = (*REDIS_ERRORS, TimeoutError)


class RedisUnavailable(Exception):
    """Redis cannot be read, or has not been read for longer than the staleness bound."""


class StreamReader:
    def __init__(
        self,
        client: Client,
        metrics: ScalerMetrics,
        *,
        stale_after_s: float = 10.0,
        liveness_s: float = 5.0,
        block_ms: int = 250,
        batch: int = 5000,
        clock_sync_s: float = 5.0,
        ceiling: IngestCeiling | None = None,
        poll_ms: int = 100,
        slots: SlotReads | None = None,
    ) -> None:
        self.client = client
        self.slots = slots  # on a Redis Cluster: the per-slot reads
        self.metrics = metrics
        self.stale_after_s = stale_after_s
        self.liveness_ms = int(liveness_s * 1000)
        self.block_ms = block_ms
        self.poll_ms = poll_ms
        self.batch = batch
        self.clock_sync_s = clock_sync_s
        self.ceiling = ceiling or IngestCeiling()
        self.series: dict[str, WorkloadSeries] = {}
        self.bad_entries: dict[str, int] = {}
        self._last_ids: dict[str, str] = {}
        self._key_workload: dict[str, str] = {}
        self._logged_bad: set[str] = set()
        self._backfills: dict[str, asyncio.Task[None]] = {}
        self._offset_ms = 0.0
        self._last_sync = -1e9
        self._last_ok = -1e9
        # On a cluster, streams whose master failed the last read: key -> (when last read, error)
        self._failing: dict[str, tuple[float, str]] = {}
        self._key_read: dict[str, float] = {}  # on a cluster: key -> when its master last answered
        self._next_poll = 0.0  # on a cluster: when the next round of reads may start
        self.last_error: str | None = None
        self._applied = asyncio.Event()  # set (and replaced) each time a poll applies entries
        self._revived = asyncio.Event()  # set (and replaced) when a read succeeds after stale data

    def applied(self) -> asyncio.Event:
        """An event set when the next poll applies entries (a gateway's held demand among them)."""
        return self._applied

    def revived(self) -> asyncio.Event:
        """An event set when the next read succeeds while the data is stale (or never read)."""
        return self._revived

    # -- time and health -------------------------------------------------------

    def now_ms(self) -> int:
        """This moment on Redis' clock, as last measured."""
        return int(time.time() * 1000 + self._offset_ms)

    def data_age_s(self) -> float:
        return time.monotonic() - self._last_ok

    def fresh(self) -> bool:
        return self.data_age_s() <= self.stale_after_s

    def check_fresh(self, workload: str | None = None) -> None:
        """Raise ``RedisUnavailable`` when the data is stale: all of it, or ``workload``'s
        stream on a cluster master that has not answered for the bound."""
        if not self.fresh():
            age = self.data_age_s()
            since = "never read" if age > 1e8 else f"not read for {age:.1f}s (bound {self.stale_after_s:g}s)"
            raise RedisUnavailable(
                f"Redis stream data is stale: {since}; last error: {self.last_error or 'none'}"
            )
        if workload is None or self.slots is None:
            return
        key = stream_key(workload)
        failing = self._failing.get(key)
        read = failing[0] if failing is not None else self._key_read.get(key)
        if read is not None and time.monotonic() - read > self.stale_after_s:
            age = time.monotonic() - read
            error = failing[1] if failing is not None else "no answer yet"
            raise RedisUnavailable(
                f"the stream of {workload} is stale: its Redis Cluster master not read for {age:.1f}s "
                f"(bound {self.stale_after_s:g}s); last error: {error}"
            )

    async def sync_clock(self) -> None:
        before = time.time() * 1000
        sec, usec = await self.client.time()
        after = time.time() * 1000
        self._offset_ms = sec * 1000 + usec / 1000 - (before + after) / 2
        self._last_sync = time.monotonic()

    async def _resync_clock(self) -> None:
        """``sync_clock``; once the clock has been read, a failure keeps the offset it has and
        tries again a second later: TIME goes to one node, and a cluster node that hangs must
        not hold up the reads of the others."""
        if self._last_sync < 0:
            await self.sync_clock()
            return
        try:
            await asyncio.wait_for(self.sync_clock(), CLOCK_TIMEOUT_S)
        except _CLOCK_ERRORS as exc:
            log.debug("reading Redis' clock failed: %s; keeping the last offset", exc)
            self._last_sync = time.monotonic() - self.clock_sync_s + 1.0

    # -- workloads ---------------------------------------------------------------

    async def ensure(self, workload: str) -> WorkloadSeries:
        """The series of ``workload``, backfilled from its stream on first use."""
        series = self.series.get(workload)
        if series is not None and workload not in self._backfills:
            return series
        task = self._backfills.get(workload)
        if task is None:
            self.series[workload] = WorkloadSeries()
            task = self._backfills[workload] = asyncio.create_task(self._backfill(workload))
        try:
            await asyncio.shield(task)
        except REDIS_ERRORS as exc:
            raise RedisUnavailable(f"cannot read the stream of {workload}: {exc}") from exc
        return self.series[workload]

    def drop(self, workload: str) -> None:
        """Stop following ``workload`` and forget what was read of it."""
        key = stream_key(workload)
        self._last_ids.pop(key, None)
        self._key_workload.pop(key, None)
        self._failing.pop(key, None)
        self._key_read.pop(key, None)
        if self.slots is not None:
            self.slots.forget(key)
        self.series.pop(workload, None)
        self.bad_entries.pop(workload, None)
        self.ceiling.drop(workload)
        self._logged_bad.discard(workload)
        self.metrics.workloads.set(len(self._key_workload))

    async def _backfill(self, workload: str) -> None:
        key = stream_key(workload)
        try:
            series = self.series[workload]
            series.clock_sec = self.now_ms() // 1000
            start = "-"
            last = "0-0"
            while True:
                page: list[tuple[bytes, Mapping[bytes, bytes]]] = await self._xrange(key, start)
                for entry_id, fields in page:
                    self._apply(workload, series, entry_id, fields)
                if len(page) < BACKFILL_PAGE:
                    if page:
                        last = page[-1][0].decode()
                    break
                last = page[-1][0].decode()
                start = "(" + last
            self._last_ids[key] = last
            self._key_workload[key] = workload
            self._key_read[key] = time.monotonic()
            self.metrics.workloads.set(len(self._key_workload))
            self._mark_ok()
        except REDIS_ERRORS:
            self.metrics.redis_errors.labels("xrange").inc()
            del self.series[workload]
            raise
        finally:
            self._backfills.pop(workload, None)

    async def _xrange(self, key: str, start: str) -> Any:
        return await self.client.xrange(key, min=start, max="+", count=BACKFILL_PAGE)

    async def _xread(self) -> Any:
        # RESP2 replies: [[key, [(id, fields), ...]], ...] or None after the block times out
        if self.slots is not None:
            return await self._xread_cluster(self.slots)
        streams: dict[Any, Any] = dict(self._last_ids)
        return await self.client.xread(streams, count=self.batch, block=self.block_ms)

    async def _xread_cluster(self, slots: SlotReads) -> Any:
        """One round of per-slot reads, at most one every ``poll_ms`` (a blocking read would
        wait on one slot only). The pace holds under load too: a round costs one command per
        slot however few entries it brings, so rounds back to back would spend the scaler's
        CPU on reads that find an entry or two each, while a round every ``poll_ms`` reads all
        that came meanwhile for the same cost.

        Raises when no master answered at all (the caller's outage handling: every stream read
        again from before its last entry, UNAVAILABLE after the stale bound); streams whose
        own master failed or has not answered turn stale alone (``check_fresh``)."""
        wait = self._next_poll - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        self._next_poll = time.monotonic() + self.poll_ms / 1000
        done = await slots.round(self._last_ids)
        now = time.monotonic()
        for key in done.answered:
            self._key_read[key] = now
            self._failing.pop(key, None)
        for key, error in done.failed.items():
            if key not in self._failing and key in self._last_ids:
                self._failing[key] = (self._key_read.get(key, now), f"{type(error).__name__}: {error}")
                self._rewind(key)
        if done.failed:
            self.metrics.redis_errors.labels("xread").inc()
        if not done.answered:
            if done.failed:
                raise next(iter(done.failed.values()))
            raise RedisConnectionError(
                f"no Redis Cluster master answered a read within {slots.wait_s:g}s "
                f"({slots.in_flight()} reads waiting)"
            )
        return done.found

    def _rewind(self, key: str | None = None) -> None:
        """Read ``key``'s stream (every stream: None) again from ``REWIND_MS`` before its last
        entry read."""
        for each in [key] if key is not None else list(self._last_ids):
            last = self._last_ids.get(each)
            ms = int(last.split("-", 1)[0]) if last else 0
            if ms > 0:
                self._last_ids[each] = f"{max(0, ms - REWIND_MS)}-0"

    # -- entries -----------------------------------------------------------------

    def _apply(
        self, workload: str, series: WorkloadSeries, entry_id: bytes, fields: Mapping[Any, Any]
    ) -> bool:
        """Apply one entry; False when it was skipped (bad, or its seq applied already)."""
        try:
            record = decode(fields)
        except RecordError as exc:
            self.metrics.bad_entries.labels(exc.field.split("[")[0]).inc()
            self.bad_entries[workload] = self.bad_entries.get(workload, 0) + 1
            if workload not in self._logged_bad:
                self._logged_bad.add(workload)
                log.warning(
                    "skipping entry %s of %s's stream: %s (further bad entries of it are only counted)",
                    entry_id.decode(errors="replace"),
                    workload,
                    exc,
                )
            return False
        implausible = self.ceiling.implausible.get(workload, 0)
        record = self.ceiling.clamp(workload, series, record, entry_id)
        if self.ceiling.implausible.get(workload, 0) != implausible:
            self.metrics.implausible.inc()
        too_old = series.too_old
        if not series.add(record, entry_id):
            self.metrics.duplicates.inc()
            return False
        self.metrics.entries.inc()
        if series.too_old != too_old:
            self.metrics.too_old.inc()
        return True

    def _mark_ok(self) -> None:
        was_fresh = self.fresh()
        self._last_ok = time.monotonic()
        self.last_error = None
        if not was_fresh:
            event, self._revived = self._revived, asyncio.Event()
            event.set()

    async def poll_once(self) -> int:
        """One XREAD over every followed stream; returns the entries applied."""
        if time.monotonic() - self._last_sync >= self.clock_sync_s:
            await self._resync_clock()
        if not self._last_ids:
            await self.client.ping()
            self._mark_ok()
            await asyncio.sleep(self.block_ms / 1000)
            return 0
        applied = self._take(await self._xread())
        self._mark_ok()
        return applied

    def _take(self, response: list[tuple[Any, list[tuple[bytes, Mapping[bytes, bytes]]]]] | None) -> int:
        """Apply an XREAD's reply (streams no longer followed are skipped); the entries applied."""
        applied = 0
        now_sec = self.now_ms() // 1000
        for raw_key, entries in response or []:
            key = raw_key.decode() if isinstance(raw_key, bytes) else raw_key
            workload = self._key_workload.get(key)
            if workload is None:
                continue
            series = self.series[workload]
            series.clock_sec = now_sec
            for entry_id, fields in entries:
                applied += self._apply(workload, series, entry_id, fields)
            if entries:
                self._last_ids[key] = entries[-1][0].decode()
        if applied:
            event, self._applied = self._applied, asyncio.Event()
            event.set()
        return applied

    async def run(self, stop: asyncio.Event) -> None:
        backoff = 0.1
        next_prune = 0.0
        while not stop.is_set():
            try:
                await self.poll_once()
                backoff = 0.1
            except REDIS_ERRORS as exc:
                self.metrics.redis_errors.labels("xread").inc()
                if self.last_error is None:
                    log.warning(
                        "reading Redis failed: %s; retrying (answers turn UNAVAILABLE after %gs)",
                        exc,
                        self.stale_after_s,
                    )
                    self._rewind()  # once per outage
                self.last_error = f"{type(exc).__name__}: {exc}"
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), backoff)
                backoff = min(backoff * 2, 2.0)
            self.metrics.data_age.set(min(self.data_age_s(), 1e9))
            if time.monotonic() >= next_prune:
                now = self.now_ms()
                for workload, series in self.series.items():
                    series.prune(now)
                    self.ceiling.forget_sidecars(workload, set(series.sidecars))
                next_prune = time.monotonic() + 10
        if self.slots is not None:
            await self.slots.close()
