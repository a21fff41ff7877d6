"""The records one writer (a sidecar, or a gateway for its held demand) sends to a workload's
stream: buffered, oldest first, up to a bound, and delivered in batches through
``record.APPEND_SCRIPT``.

While Redis is away the buffer fills, dropping the oldest past its bound; when Redis is back
the records go out in order with their original ``seq`` and ``ts``. A batch whose reply was
lost is sent again as it was: the script skips every ``seq`` it already stored.

Delivered records are kept ``RESEND_S`` longer: a failover to a replica that had not yet
received the last appends (replication is asynchronous) loses them. Each call tells the
script the highest ``seq`` delivered; when Redis holds less it appends nothing and says what
it holds, and the records above that go back to the front of the buffer, to be sent again
with their original ``seq`` and ``ts`` (readers skip any they had read before the failover). Each reply
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

from token_scaler.record import APPEND_SCRIPT, Record, append_args, seq_key, stream_key
from token_scaler.redis_conn import REDIS_ERRORS, Client

log = logging.getLogger(__name__)

# Records per script call: bounds one call's size after an outage.
BATCH = 100
# How long a delivered record is kept to be sent again should a failover lose it: well past
# a replica's lag and a failover's detection time.
RESEND_S = 60


@dataclass(slots=True)
class Pending:
    record: Record
    local_ms: int  # the record's time on the local clock
    stamped: bool  # its ts is on Redis' clock already


class Outbox:
    def __init__(
        self,
        client: Client,
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
        self.sent: deque[Pending] = deque()  # delivered in the last RESEND_S, oldest first
        self.resent = 0  # records sent again after a failover lost them
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
        expect = self.sent[-1].record.seq if self.sent else -1
        reply = await self._script(
            keys=self._keys,
            args=append_args([p.record for p in batch], self._retention_s, expect=expect),
        )
        after = self._clock()
        self.offset_ms = int(reply[2]) - round((before + after) * 500)
        if int(reply[0]) < 0:
            self._lost(int(reply[3]))
            return 0, 0
        # Only the delivered ones leave: meanwhile a new record may have been added, or the
        # oldest of this very batch dropped when the buffer was full.
        delivered = {id(p) for p in batch}
        while self.buffer and id(self.buffer[0]) in delivered:
            self.sent.append(self.buffer.popleft())
        horizon = self.local_ms() - RESEND_S * 1000
        while self.sent and (self.sent[0].local_ms < horizon or len(self.sent) > self._limit):
            self.sent.popleft()
        return int(reply[0]), len(batch)

    def _lost(self, stored: int) -> None:
        """Redis holds ``stored`` as the last seq, below what was delivered: the records above
        it go back to the front of the buffer."""
        lost = [p for p in self.sent if p.record.seq > stored]
        self.sent.clear()
        self.buffer.extendleft(reversed(lost))
        self.resent += len(lost)
        log.warning(
            "Redis lost %d %s delivered before (a failover); sending them again", len(lost), self._what
        )
