"""What the policies keep up once a tick: Redis' clock, leases, presence, saturation.

Budget periods (UTC day and month) are read on Redis' clock: every reply carries Redis'
time and ``RedisClock`` keeps the offset, so sidecars with skewed clocks charge one day.

Reservations are leased (``reservationLeaseSeconds``): ``Leases`` renews those of the
requests in flight and of the chunks every third of it, so the reservation of a sidecar
that died mid-request is released by the tenant's next admission once its lease ends
(store.py).

``Presence``: a sidecar announces itself every ``ANNOUNCE_S`` and learns how many share its
scope (a rate limit's share while Redis is away, a chunk's share of a limit).

``SaturationWatch`` reads the scaler's saturation key when a downgrade rule needs it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import uuid

from sidecar.policy.chunks import Chunk
from sidecar.policy.clock import Clock
from sidecar.policy.context import Context
from sidecar.policy.failopen import Outage
from sidecar.policy.settlement import BATCH
from sidecar.policy.store import Store
from sidecar.policy.tickets import Ticket
from token_scaler.redis_conn import REDIS_ERRORS
from token_scaler.saturation import NOT_SATURATED, Saturation, decode, saturation_key

log = logging.getLogger(__name__)

# How often a sidecar announces itself; well inside store.PRESENCE_WINDOW_MS. Its peers'
# count, as of its last announcement, sets its share of each budget and rate limit while
# Redis is away, so a count behind a fleet's growth lets the shares add up to more than
# there is: four sidecars started together first count 1, 2, 3 and 4, whose shares add up to
# 2.08 times what was left. Every 2 s bounds that to a fleet that grew in the last 2 s.
ANNOUNCE_S = 2.0


class RedisClock:
    """Redis' clock as this sidecar reads it: its own wall clock plus the offset last seen."""

    def __init__(self, clock: Clock) -> None:
        self._here = clock
        self.offset_s = 0.0  # Redis' clock minus ours
        self.synced = False

    def now(self) -> float:
        return self._here.wall() + self.offset_s

    def saw(self, redis_time_ms: int) -> None:
        """A reply's Redis time (every admission's carries it)."""
        self.offset_s = redis_time_ms / 1000 - self._here.wall()
        self.synced = True

    async def sync(self, store: Store, outage: Outage, timeout_s: float) -> None:
        """Redis' clock before the first admission: its replies keep the offset after that."""
        try:
            redis_now = await asyncio.wait_for(store.time(), timeout_s)
        except REDIS_ERRORS as exc:
            outage.failed("time", exc)
            return
        self.offset_s = redis_now - self._here.wall()
        self.synced = True


class Leases:
    """The reservations in flight (reserved in Redis, not settled yet) and their renewal."""

    def __init__(
        self,
        ctx: Context,
        outage: Outage,
        tick_s: float,
    ) -> None:
        self._ctx = ctx
        self._outage = outage
        self._tick_s = tick_s
        self._open: dict[str, Ticket] = {}  # by id
        self._renewed = 0.0  # monotonic time of the last renewal

    def __bool__(self) -> bool:
        """Some reservation is in flight."""
        return bool(self._open)

    def hold(self, ticket: Ticket) -> None:
        """A request reserved in Redis: its lease is renewed until it ends."""
        self._open[ticket.id] = ticket

    def end(self, id: str) -> None:
        """The request ended (its settlement releases the reservation)."""
        self._open.pop(id, None)

    def due(self) -> bool:
        return self._ctx.clock.monotonic() - self._renewed >= self._ctx.file.renew_every_s(self._tick_s)

    async def renew(self, chunks: list[Chunk]) -> None:
        """Push the leases of the reservations in flight and of ``chunks`` (a script per tenant,
        ``BATCH`` tenants a pipeline: with thousands of tenants holding chunks, one pipeline
        of all of them would hold the loop and could outlast its timeout). A chunk renewed
        may admit on for its draw window from when the renewal was sent."""
        leases: dict[str, list[str]] = {}
        held = {chunk.ticket.id: chunk for chunk in chunks}
        for ticket in [*self._open.values(), *(chunk.ticket for chunk in held.values())]:
            leases.setdefault(ticket.keys.lease, []).append(ticket.id)
        keys = list(leases)
        timeout_s, lease_ms = self._ctx.file.background_timeout_s, int(self._ctx.file.policy.lease_s * 1000)
        for start in range(0, len(keys), BATCH):
            batch = {key: leases[key] for key in keys[start : start + BATCH]}
            sent = self._ctx.clock.monotonic()
            try:
                async with asyncio.timeout(timeout_s):
                    renewed = await self._ctx.store.renew(batch, lease_ms)
            except REDIS_ERRORS as exc:
                self._outage.failed("renew", exc)
                return
            for id in renewed:  # renewed no later than ``sent``: they may admit on (the others not)
                chunk = held.get(id)
                if chunk is not None:
                    chunk.until = max(chunk.until, sent + self._ctx.file.draw_window_s)
        self._renewed = self._ctx.clock.monotonic()


class Presence:
    """This sidecar among its scope's: its id, and how many announced themselves lately."""

    def __init__(
        self,
        ctx: Context,
        outage: Outage,
    ) -> None:
        self._ctx = ctx
        self._outage = outage
        self.id = uuid.uuid4().hex[:16]  # also the prefix of its reservation ids
        self.peers = 1  # sidecars of the scope seen in the last minute, this one included
        self._announced = -math.inf

    def due(self) -> bool:
        return self._ctx.clock.monotonic() - self._announced >= ANNOUNCE_S

    async def announce(self) -> None:
        scope = self._ctx.file.policy.scope
        try:
            async with asyncio.timeout(self._ctx.file.background_timeout_s):
                peers = await self._ctx.store.announce(scope, self.id)
        except REDIS_ERRORS as exc:
            self._outage.failed("presence", exc)
            return
        self._announced = self._ctx.clock.monotonic()
        if peers != self.peers:
            log.info("%d sidecars share the rate limits of scope %s", peers, scope)
        self.peers = max(1, peers)
        self._ctx.metrics.scope_sidecars.labels(scope).set(self.peers)

    async def leave(self, timeout_s: float) -> None:
        """At shutdown: the others' share grows a minute sooner."""
        with contextlib.suppress(*REDIS_ERRORS):
            await asyncio.wait_for(self._ctx.store.leave(self._ctx.file.policy.scope, self.id), timeout_s)


class SaturationWatch:
    """The scaler's saturation signal of this workload, for downgrades ``whenSaturated``."""

    def __init__(
        self,
        ctx: Context,
        outage: Outage,
        workload: str,
    ) -> None:
        self._ctx = ctx
        self._outage = outage
        self._key = saturation_key(workload)
        self.saturation: Saturation = NOT_SATURATED

    async def poll(self) -> None:
        try:
            raw = await asyncio.wait_for(
                self._ctx.store.get(self._key), self._ctx.file.policy.redis_timeout_s
            )
        except REDIS_ERRORS as exc:
            self._outage.failed("saturation", exc)
            return
        self.saturation = decode(raw, int(self._ctx.clock.wall() * 1000))
        self._ctx.metrics.saturated.set(1 if self.saturation.saturated else 0)
