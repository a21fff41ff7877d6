"""The demand of held requests, written to the workload's stream (``record.py`` states the contract).

``HeldDemand`` counts, per model, what the gateway holds: a request's arrival (the request
and its token estimates) when it starts waiting, taken back when it stops (handed to a
replica, refused, timed out, its client gone). Over a request's life its counters sum to
zero; the sidecar that serves it counts it as usual. ``DemandWriter`` sends those counts
as stream records through the append script: one per interval while there is something to
say, and one at once, stamped in the last complete second, when holding starts after
holding none (``token_scaler/outbox.py`` buffers and delivers them, as it does a sidecar's).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from token_scaler.outbox import Outbox
from token_scaler.record import GATEWAY, ModelCounts, Record
from token_scaler.redis_conn import REDIS_ERRORS, Client

log = logging.getLogger(__name__)


@dataclass(slots=True, eq=False)
class Held:
    model: str
    prompt: int
    generation: int
    released: bool = False


class HeldDemand:
    """Per-model counters (deltas since the last ``take``) and gauges (running) of held requests."""

    def __init__(self) -> None:
        self._models: dict[str, ModelCounts] = {}
        self._reported: set[str] = set()
        self.held = 0

    def hold(self, model: str, prompt: int, generation: int) -> Held:
        c = self._models.get(model)
        if c is None:
            c = self._models[model] = ModelCounts()
        c.arrived_prompt += prompt
        c.arrived_generation += generation
        c.arrived_requests += 1
        c.backlog_prompt += prompt
        c.backlog_generation += generation
        c.inflight += 1
        c.waiting += 1
        self.held += 1
        return Held(model, prompt, generation)

    def release(self, held: Held) -> None:
        """The request stops waiting: its arrival is taken back (a replica's sidecar counts it)."""
        if held.released:
            return
        held.released = True
        c = self._models[held.model]
        c.arrived_prompt -= held.prompt
        c.arrived_generation -= held.generation
        c.arrived_requests -= 1
        c.backlog_prompt -= held.prompt
        c.backlog_generation -= held.generation
        c.inflight -= 1
        c.waiting -= 1
        self.held -= 1

    def take(self) -> dict[str, ModelCounts]:
        """Counters since the last call and gauges now; a model shows while it has something,
        and once more after its gauges fall to zero."""
        out: dict[str, ModelCounts] = {}
        for name, c in list(self._models.items()):
            busy = bool(c.inflight)
            if busy or name in self._reported or any(c.counters()):
                out[name] = ModelCounts(*c.as_list())
            c.clear_counters()
            if busy:
                self._reported.add(name)
            else:
                self._reported.discard(name)
                if name not in out:
                    del self._models[name]
        return out


class DemandWriter:
    def __init__(
        self,
        client: Client,
        demand: HeldDemand,
        *,
        workload: str,
        gateway_id: str,
        interval_s: float = 1.0,
        retention_s: int = 1200,
        buffer_records: int = 900,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._demand = demand
        self.outbox = Outbox(
            client,
            workload=workload,
            writer_id=gateway_id,
            retention_s=retention_s,
            limit=buffer_records,
            what="held-demand records",
            clock=clock,
        )
        self.gateway_id = gateway_id
        self._interval_s = interval_s
        self._seq = round(clock() * 1000)  # above any seq a predecessor with this id stored
        self._last_cut = time.monotonic()
        self._wake: asyncio.Task[bool] | None = None
        self._last_wake = -1e9
        self.records = 0
        self.dropped = 0

    @property
    def buffered(self) -> int:
        return len(self.outbox.buffer)

    def redis_ms(self) -> int:
        return self.outbox.local_ms() + (self.outbox.offset_ms or 0)

    def cut(self, *, previous_second: bool = False) -> Record | None:
        """A record of what changed since the last cut; None when there is nothing to say."""
        models = self._demand.take()
        now = time.monotonic()
        interval_ms = max(1, round((now - self._last_cut) * 1000))
        self._last_cut = now
        if not models:
            return None
        ts = self.redis_ms()
        if previous_second:
            ts, interval_ms = ts // 1000 * 1000 - 1, 1
        self._seq += 1
        record = Record(self.gateway_id, self._seq, ts, interval_ms, models, role=GATEWAY)
        if self.outbox.add(record, ts, stamped=True):
            self.dropped += 1
        return record

    def wake(self) -> None:
        """Holding starts: write the held demand now, in the last complete second (at most
        once an interval: later holds go out with the next tick)."""
        now = time.monotonic()
        if now - self._last_wake < self._interval_s:
            return
        self._last_wake = now
        self.cut(previous_second=True)
        self._wake = asyncio.create_task(self.deliver())

    async def deliver(self) -> bool:
        """Send everything buffered, oldest first; False when Redis failed (kept for later)."""
        return await self.outbox.deliver(sent=self._sent)

    def _sent(self, added: int, batch: int) -> None:
        self.records += batch

    async def run(self) -> None:
        with contextlib.suppress(*REDIS_ERRORS):
            await self.outbox.learn_offset()
        while True:
            await asyncio.sleep(self._interval_s)
            self.cut()
            if self.buffered:
                await self.deliver()

    async def close(self, timeout_s: float) -> bool:
        self.cut()
        try:
            return await asyncio.wait_for(self.deliver(), timeout_s)
        except TimeoutError:
            log.warning("Redis did not take the last %d held-demand records", self.buffered)
            return False
