"""The records one writer (a sidecar, or a gateway for its held demand) sends to a workload's
stream: buffered, oldest first, up to a bound, and delivered in batches through
``record.APPEND_SCRIPT``.

While Redis is away the buffer fills, dropping the oldest past its bound; when Redis is back
the records go out in order with their original ``seq`` and ``ts``. A batch whose reply was
lost is sent again as it was: the script skips every ``seq`` it already stored. Each reply
carries Redis' time, from which the offset of the local clock to Redis' is learnt; a record
added before any offset was known (``stamped=False``) gets its ``ts`` from the first offset
learnt, before it is first sent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import redis.asyncio as aioredis

from token_scaler.record import APPEND_SCRIPT, Record, append_args, seq_key, stream_key
from token_scaler.redis_conn import REDIS_ERRORS

log = logging.getLogger(__name__)

# Records per script call: bounds one call's size after an outage.
BATCH = 100


@dataclass(slots=True)
class Pending:
    record: Record
    local_ms: int  # the record's time on the local clock
    stamped: bool  # its ts is on Redis' clock already


class Outbox:
    def __init__(
        self,
        client: aioredis.Redis,
        *,
        workload: str,
        writer_id: str,
        retention_s: int,
        limit: int,
        what: str = "records",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self._keys = [stream_key(workload), seq_key(workload, writer_id)]
        self._script = client.register_script(APPEND_SCRIPT)
        self._retention_s = retention_s
        self._limit = limit
        self._what = what  # as the log lines name the records
        self._clock = clock
        self.buffer: deque[Pending] = deque()
        self.offset_ms: int | None = None
        self._lock = asyncio.Lock()
        self._failing = False

    def local_ms(self) -> int:
        return round(self._clock() * 1000)

    def add(self, record: Record, local_ms: int, *, stamped: bool) -> bool:
        """Buffer a record; True when the buffer was full and its oldest record was dropped."""
        dropped = len(self.buffer) >= self._limit
        if dropped:
            self.buffer.popleft()
        self.buffer.append(Pending(record, local_ms, stamped))
        return dropped

    async def learn_offset(self) -> None:
        before = self._clock()
        seconds, micros = await self.client.time()
        after = self._clock()
        self.offset_ms = seconds * 1000 + micros // 1000 - round((before + after) * 500)

    async def deliver(
        self, *, learn_first: bool = False, sent: Callable[[int, int], None] = lambda added, batch: None
    ) -> bool:
        """Send everything buffered, oldest first; False when Redis failed (kept for later).

        ``learn_first``: ask Redis' time first while no offset is known; ``sent(added, batch)``
        after each batch (records stored, records sent)."""
        async with self._lock:
            try:
                if learn_first and self.offset_ms is None:
                    await self.learn_offset()
                while self.buffer:
                    added, size = await self._send(self._batch())
                    sent(added, size)
            except REDIS_ERRORS as exc:
                if not self._failing:  # once per outage, not once a second
                    log.warning("Redis unreachable, %s buffered: %s", self._what, exc)
                self._failing = True
                return False
            if self._failing:
                log.info("Redis reachable again; buffered %s delivered", self._what)
                self._failing = False
            return True

    def _batch(self) -> list[Pending]:
        batch: list[Pending] = []
        for pending in self.buffer:
            if len(batch) >= BATCH:
                break
            if not pending.stamped and self.offset_ms is not None:
                pending.record.ts_ms = pending.local_ms + self.offset_ms
                pending.stamped = True
            batch.append(pending)
        return batch

    async def _send(self, batch: list[Pending]) -> tuple[int, int]:
        before = self._clock()
        reply = await self._script(
            keys=self._keys, args=append_args([p.record for p in batch], self._retention_s)
        )
        after = self._clock()
        self.offset_ms = int(reply[2]) - round((before + after) * 500)
        # Only the delivered ones leave: meanwhile a new record may have been added, or the
        # oldest of this very batch dropped when the buffer was full.
        delivered = {id(p) for p in batch}
        while self.buffer and id(self.buffer[0]) in delivered:
            self.buffer.popleft()
        return int(reply[0]), len(batch)
