"""Settlements: a request's real usage sent to Redis off the request path, none lost.

A settlement waits in an outbox; the next admission takes it along (queued just before it,
they leave in the same write of the one pipelined connection, token_scaler/redis_channel.py),
or after ``SETTLE_LINGER_S`` it goes on its own: under load a request costs one round trip,
not two. A settlement Redis does not take (it is away, or refuses for now) waits in a queue
and is sent again every tick: settling is idempotent (store.py), so no refund or charge is
lost while Redis is away, and none is made twice.

``Corrections`` are the moves of a model's limit across tenants (off the request path; a
lost one only tightens the limit for a burst).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from redis.exceptions import ResponseError

from sidecar.policy.context import Context
from sidecar.policy.failopen import Outage
from sidecar.policy.scripts import Applied
from sidecar.policy.store import Item, Settled, settle_args
from sidecar.policy.tickets import Ticket
from sidecar.policy.usage import Usage
from token_scaler.redis_conn import REDIS_ERRORS

log = logging.getLogger(__name__)

MAX_PENDING = 100_000
BATCH = 200  # settlements (or checkpoints, leases) per pipeline
# Settlements wait this long for the next admission to take them along (off the request
# path; at 20 requests/s and more nearly all ride, below that they go on their own).
SETTLE_LINGER_S = 0.05

# Redis refusing for now: still loading, busy with a script, a replica after a failover, out
# of memory, ... (inside a script these read "READONLY ... script: <sha>, on @user_script").
_TRANSIENT = (
    "READONLY", "LOADING", "BUSY", "OOM", "MISCONF", "MASTERDOWN", "NOREPLICAS",
    "TRYAGAIN", "CLUSTERDOWN", "NOSCRIPT", "ERR max number of clients",
)  # fmt: skip


def script_fault(error: ResponseError) -> bool:
    """An error of the script itself (it would fail again), not Redis refusing for now."""
    text = str(error)
    if text.startswith(_TRANSIENT):
        return False
    return "script:" in text or "user_script" in text or text.startswith("WRONGTYPE")


@dataclass(slots=True)
class Settlement:
    ticket: Ticket
    cost: int
    tokens: int
    moved: bool = False  # the model-wide limit was corrected (or needs no correction)
    sent: bool = False  # sent before and no reply came: Redis may have applied it


async def batch_replies(
    outage: Outage,
    timeout_s: float,
    op: str,
    sent: Awaitable[list[Settled | BaseException]],
    again: Callable[[], None],
) -> list[Settled | BaseException] | None:
    """The replies of a batch of settlements or checkpoints; None when Redis did not answer
    in time, after ``again`` put the batch back to be sent again (also when cancelled, at
    shutdown: nothing is lost)."""
    try:
        async with asyncio.timeout(timeout_s):
            return await sent
    except REDIS_ERRORS as exc:
        outage.failed(op, exc)
        again()
        return None
    except BaseException:
        again()
        raise


class Corrections:
    """Moves of a model's limit across tenants, their replies awaited off the request path."""

    def __init__(
        self,
        ctx: Context,
    ) -> None:
        self._ctx = ctx
        self._tasks: set[asyncio.Task[None]] = set()

    def move(self, key: str, ms: float) -> None:
        """Move the limit's TAT by ``ms`` (queued now); a failure only counts (what it fixes is a rate)."""
        reply = self._ctx.store.move(key, ms)

        async def wait() -> None:
            try:
                async with asyncio.timeout(self._ctx.file.background_timeout_s):
                    result = await reply
                if isinstance(result, ResponseError):  # error replies arrive as values
                    raise result
            except REDIS_ERRORS as exc:
                self._ctx.metrics.redis_errors.labels("move").inc()
                # A script error says more than a connection lost (already said elsewhere).
                level = logging.WARNING if isinstance(exc, ResponseError) else logging.DEBUG
                log.log(level, "a model-wide rate limit correction was not applied: %r", exc)

        task = asyncio.create_task(wait())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


class Settlements:
    """The outbox (sent with the next write), the queue (waiting for Redis) and the batches in flight."""

    def __init__(
        self,
        ctx: Context,
        outage: Outage,
        usage: Usage,
        corrections: Corrections,
    ) -> None:
        self._ctx = ctx
        self._outage = outage
        self._usage = usage
        self._corrections = corrections
        self.pending: deque[Settlement] = deque()  # waiting for Redis, sent again every tick
        self.outbox: list[Settlement] = []  # sent with the next admission, or within a linger
        self.inflight: set[asyncio.Task[bool]] = set()  # batches sent, replies awaited
        self._linger: asyncio.TimerHandle | None = None
        self._riders: list[Callable[[], None]] = []

    def ride(self, send: Callable[[], None]) -> None:
        """``send`` queues its own commands ahead of each outbox sent (the chunks' checkpoints)."""
        self._riders.append(send)

    @property
    def busy(self) -> bool:
        """Settlements are on their way to Redis."""
        return bool(self.outbox) or bool(self.inflight) or self._linger is not None

    def add(self, settlement: Settlement) -> None:
        """A request ended: into the outbox, or the queue while Redis is away."""
        if self._outage.down:
            self.queue(settlement)
        else:
            self.post(settlement)

    def release(self, ticket: Ticket) -> None:
        """Release a reservation the admission may have made though its reply never came.

        The model limit across tenants is left as it is: whether it took the tokens is not
        known, and giving back what it never took would loosen it.
        """
        self.queue(Settlement(ticket, 0, 0, moved=True))

    def post(self, settlement: Settlement) -> None:
        """Into the outbox: sent with the next admission, or after ``SETTLE_LINGER_S``."""
        self.outbox.append(settlement)
        self.soon()

    def soon(self) -> None:
        """Send the outbox (and what rides with it) within ``SETTLE_LINGER_S``."""
        if self._linger is None:
            self._linger = asyncio.get_running_loop().call_later(SETTLE_LINGER_S, self.send_outbox)

    def send_outbox(self) -> None:
        """Queue the outbox's settlements on the channel now; their replies are awaited apart."""
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        outbox, self.outbox = self.outbox, []
        if self._outage.down:
            for settlement in outbox:
                self.queue(settlement)
            return
        for send in self._riders:
            send()
        for start in range(0, len(outbox), BATCH):
            self.track(self._send(outbox[start : start + BATCH]))

    def track(self, batch: Coroutine[Any, Any, bool]) -> None:
        """Await a batch's replies apart (``inflight`` until they are applied)."""
        task = asyncio.create_task(batch)
        self.inflight.add(task)
        task.add_done_callback(self.inflight.discard)

    async def resend(self) -> None:
        """Send the queue again, a batch at a time, while Redis takes them."""
        while self.pending and not self._outage.down:
            batch = [self.pending.popleft() for _ in range(min(BATCH, len(self.pending)))]
            if not await self._send(batch):
                # Queued again at the back: order does not matter, each is idempotent.
                break
        self._ctx.metrics.pending.set(len(self.pending))

    async def reconcile(self) -> bool:
        """While Redis is still taken for away but answers: send the settlements queued by
        then (those queued meanwhile follow with ``resend``); whether Redis took them all."""
        for _ in range(-(-len(self.pending) // BATCH)):
            batch = [self.pending.popleft() for _ in range(min(BATCH, len(self.pending)))]
            if batch and not await self._send(batch):
                self._ctx.metrics.pending.set(len(self.pending))
                return False
        self._ctx.metrics.pending.set(len(self.pending))
        return True

    def _send(self, batch: list[Settlement]) -> Coroutine[Any, Any, bool]:
        """Queue a batch's settlements (and model-limit corrections) on the channel now; the
        coroutine returned applies their replies."""
        self._move(batch)
        return self._settled(batch, self._ctx.store.settle_many(self._items(batch)))

    def _move(self, batch: list[Settlement]) -> None:
        """Correct the model limits across tenants to the real tokens, once per settlement."""
        for settlement in batch:
            ticket = settlement.ticket
            if settlement.moved or ticket.wide_key is None or not ticket.reserved:
                continue
            settlement.moved = True
            delta = settlement.tokens - ticket.tokens
            if delta:
                self._corrections.move(ticket.wide_key, delta * ticket.wide_interval)

    @staticmethod
    def _items(batch: list[Settlement]) -> list[Item]:
        items = []
        for s in batch:
            ticket = s.ticket
            args = settle_args(
                id=ticket.id,
                cost=s.cost,
                tokens=s.tokens,
                daily=ticket.budget.daily is not None,
                monthly=ticket.budget.monthly is not None,
                tenant_interval=ticket.tenant_interval,
                model_interval=ticket.model_interval,
                unreserved=not ticket.reserved,
            )
            items.append((ticket.keys, args))
        return items

    async def _settled(self, batch: list[Settlement], sent: Awaitable[list[Settled | BaseException]]) -> bool:
        """Apply the replies of a batch of settlements; those Redis did not take wait in the
        queue (sent again: settling is idempotent)."""

        def again() -> None:
            for settlement in batch:
                settlement.sent = True
                self.queue(settlement)

        replies = await batch_replies(
            self._outage, self._ctx.file.policy.redis_timeout_s, "settle", sent, again
        )
        if replies is None:
            return False
        failure: BaseException | None = None
        for settlement, settled in zip(batch, replies, strict=True):
            ticket = settlement.ticket
            if isinstance(settled, ResponseError) and script_fault(settled):
                # The script itself failed (a key of the wrong type, say): sending it again
                # would fail again. Said loudly, with what was not charged.
                self._forget_local(settlement)
                self._ctx.metrics.redis_errors.labels("settle_script").inc()
                log.error(
                    "Redis refused the settlement of a request of tenant %s (%s tokens, cost %s): %s",
                    ticket.tenant,
                    settlement.tokens,
                    settlement.cost,
                    settled,
                )
                continue
            if isinstance(settled, BaseException):
                # A lost connection, or Redis refusing for now (LOADING, BUSY, READONLY after a
                # failover, OOM): sent again once it answers.
                failure = settled
                settlement.sent = True
                self.queue(settlement)
                continue
            if settled.applied == Applied.RELEASED:
                log.warning(
                    "request of tenant %s settled after its lease ended and its reservation was "
                    "released: charged in full (raise reservationLeaseSeconds if this sidecar stalls)",
                    ticket.tenant,
                )
            self._forget_local(settlement)
            self._usage.saw(ticket, settled.day_used, settled.month_used)
            if settled.applied == Applied.NONE and self._lost_reservation(settlement):
                self._charge_without(settlement)
        if failure is not None:
            self._outage.failed("settle", failure)
            return False
        return True

    @staticmethod
    def _lost_reservation(settlement: Settlement) -> bool:
        """Redis found nothing to settle though it had reserved: it lost the reservation,
        unless an earlier send of this settlement (its reply lost) applied it already."""
        return settlement.ticket.reserved and settlement.cost > 0 and not settlement.sent

    def _charge_without(self, settlement: Settlement) -> None:
        """Charge the request's real cost without a reservation, once (under an id of its
        own; budgets only, as a fail-open request's)."""
        ticket = settlement.ticket
        self._ctx.metrics.redis_errors.labels("reservation_lost").inc()
        log.error(
            "Redis lost the reservation of a request of tenant %s (failover or restart?): "
            "its %s tokens (cost %s) are charged without it",
            ticket.tenant,
            settlement.tokens,
            settlement.cost,
        )
        unreserved = dataclasses.replace(ticket, id=f"{ticket.id}.lost", reserved=False, wide_key=None)
        self._outage.add(ticket.tenant, settlement.cost)
        self.post(Settlement(unreserved, settlement.cost, settlement.tokens, moved=True))

    def _forget_local(self, settlement: Settlement) -> None:
        """A fail-open request's cost is in Redis now (or never will be): not local any more."""
        if not settlement.ticket.reserved:
            self._outage.forget(settlement.ticket.tenant, settlement.cost)

    def queue(self, settlement: Settlement) -> None:
        if len(self.pending) >= MAX_PENDING:
            lost = self.pending.popleft()
            self._forget_local(lost)
            log.error(
                "settlement queue full: dropped the settlement of a request of tenant %s (%s tokens)",
                lost.ticket.tenant,
                lost.tokens,
            )
        self.pending.append(settlement)
        self._ctx.metrics.pending.set(len(self.pending))
