"""When Redis counts as unreachable, and what fail-open may spend meanwhile.

``Outage`` keeps whether Redis is away (an error or ``redisTimeoutMs`` on a call: until a
ping answers, every request is decided without it) and what was admitted without it:
``failMode: closed`` answers 503; ``failMode: open`` admits within this sidecar's share of
the budget left, and enforces each rate limit locally, its share of it (the limit divided by
the sidecars of the scope seen in the last minute).

**A stalled loop is not a slow Redis.** A policy call's timeout (``redisTimeoutMs``) is a
timer on the sidecar's own event loop: while the loop is held (a large body parsed, a long
callback, CPU throttling), the timer fires late, and the reply that arrived meanwhile sits
unread. Taken at face value, every such stall would mark Redis unreachable and switch the
sidecar to fail-open. ``Guard`` therefore measures the round trip, not the wait: a beat every
``BEAT_S`` adds up how late the loop ran (the time it was held), and a call's timeout is the
time the loop *ran* while it waited: at its deadline the time held since the call went out is
given back as more wait, up to ``MAX_EXTENSIONS`` times. A timeout of a call without a
deadline of its own (background calls) is excused when the loop was held longer than
``STALL_S`` within that call's time: counted in ``tokenscaler_policy_loop_stalls_total``,
Redis stays reachable.

**What fail-open may spend.** With P sidecars in the scope (those that announced themselves
in the last minute), each admits for a tenant, without Redis, at most 1/P of what was left of
each of its budgets when it last saw the tenant's usage (a tenant it has not seen: of the whole
budget). Over an outage a tenant therefore spends at most what was left of its budget when
Redis went away (a whole budget if no sidecar had seen it), plus the prompt-estimate error of
the requests admitted; a request whose own estimate does not fit its share, one larger than
the whole budget included, is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from sidecar.policy import ratelimit, refusals
from sidecar.policy.context import Context
from sidecar.policy.refusals import Rejection
from sidecar.policy.schema import CLOSED, Budget, TenantPolicy
from sidecar.policy.tickets import Ticket
from sidecar.policy.usage import Usage
from token_scaler.redis_conn import REDIS_ERRORS

log = logging.getLogger(__name__)

BEAT_S = 0.02  # 50 wake-ups a second
STALL_S = 0.05  # a beat this late is the loop held, not timer jitter
MAX_EXTENSIONS = 20


class Guard:
    """Tells a stalled event loop from a slow Redis."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._due = 0.0
        self._held = 0.0  # seconds the loop ran late, summed over the beats
        self._last_stall = -1e18  # loop time at the end of the last stall past STALL_S
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop = loop
            self._due = loop.time() + BEAT_S
            self._handle = loop.call_at(self._due, self._beat)
        return loop

    def _beat(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        late = now - self._due
        if late > 0:
            self._held += late
            if late >= STALL_S:
                self._last_stall = now
        self._due = now + BEAT_S
        self._handle = self._loop.call_at(self._due, self._beat)

    def held(self) -> float:
        """Seconds the loop has been held so far, the stall still in progress included."""
        if self._loop is None:
            return 0.0
        return self._held + max(0.0, self._loop.time() - self._due)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._loop = self._handle = None

    @contextlib.asynccontextmanager
    async def round_trip(self, timeout_s: float) -> AsyncIterator[None]:
        """Like ``asyncio.timeout(timeout_s)``, counting only the time the loop ran."""
        loop = self.start()
        started, held = loop.time(), self.held()
        extensions = 0
        async with asyncio.timeout(None) as scope:
            handles: list[asyncio.TimerHandle] = []

            def check() -> None:
                nonlocal extensions
                ran = loop.time() - started - (self.held() - held)
                if ran >= timeout_s or extensions >= MAX_EXTENSIONS:
                    scope.reschedule(loop.time())
                    return
                extensions += 1
                handles.append(loop.call_at(loop.time() + timeout_s - ran, check))

            handles.append(loop.call_at(started + timeout_s, check))
            try:
                yield
            finally:
                handles[-1].cancel()

    def excuses(self, exc: BaseException, within_s: float) -> bool:
        """A timeout the loop's own stall explains: the loop was held within the last ``within_s``."""
        if not isinstance(exc, TimeoutError) or self._loop is None:
            return False
        self.held()
        now = self._loop.time()
        return now - self._last_stall <= within_s or now - self._due >= STALL_S


def fits_share(budget: Budget, used: tuple[int, int] | None, local: int, cost: int, peers: int) -> bool:
    """Whether ``cost`` fits this sidecar's share of what was left of each budget, without Redis.

    ``used``: the day's and month's usage as last seen (None: never seen); ``local``: what this
    sidecar admitted for the tenant since without Redis; ``peers``: the scope's sidecars.
    """
    day_used, month_used = used or (0, 0)
    for limit, spent in ((budget.daily, day_used), (budget.monthly, month_used)):
        if limit and local + cost > max(0, limit - spent) / max(1, peers):
            return False
    return True


class Outage:
    """Whether Redis is away, and the cost and rate admitted without it, per tenant."""

    def __init__(
        self,
        ctx: Context,
    ) -> None:
        self._ctx = ctx
        self.down = False
        self.guard = Guard()  # a stalled loop is not a slow Redis
        self._local: dict[str, int] = {}  # cost admitted without Redis, not reconciled yet
        self._rates = ratelimit.LocalLimiter()

    def failed(self, op: str, exc: BaseException) -> None:
        """A call ``op`` failed: Redis is away from now on (unless the loop's stall explains it)."""
        if op != "admit" and self.guard.excuses(exc, self._ctx.file.background_timeout_s):
            self._ctx.metrics.loop_stalls.labels(op).inc()  # the loop was held, not Redis
            return
        self._ctx.metrics.redis_errors.labels(op).inc()
        if isinstance(exc, TimeoutError):
            # No reply in time: the peer may be gone without a reset. A new connection
            # finds out; the replies still owed on this one fail now.
            self._ctx.store.channel.reset()
        if not self.down:
            log.warning("policy store (Redis) unreachable, deciding without it until it answers: %r", exc)
        self.down = True

    async def reachable(self) -> bool:
        """While away: whether Redis answers a ping now (still away until ``back``)."""
        try:
            await asyncio.wait_for(self._ctx.store.ping(), self._ctx.file.background_timeout_s)
        except TimeoutError:
            self._ctx.store.channel.reset()  # a connection that takes commands and never answers
            return False
        except REDIS_ERRORS:
            return False
        return True

    def back(self, pending: int) -> None:
        """Redis answers and has the charges made without it: admissions go to it again."""
        self.down = False
        log.info("policy store (Redis) reachable again; %d settlements still to send", pending)

    def local(self, tenant: str) -> int:
        """The cost admitted for the tenant without Redis and not charged to it yet."""
        return self._local.get(tenant, 0)

    def add(self, tenant: str, cost: int) -> None:
        """Cost charged here that Redis has not taken yet (negative: a correction)."""
        self._local[tenant] = self._local.get(tenant, 0) + cost

    def forget(self, tenant: str, cost: int) -> None:
        """Redis took ``cost`` of what was charged here (or never will): not local any more."""
        left = self._local.get(tenant, 0) - cost
        if left > 0:
            self._local[tenant] = left
        else:
            self._local.pop(tenant, None)

    def admit(
        self, rules: TenantPolicy, ticket: Ticket, model: str | None, usage: Usage, peers: int, now: float
    ) -> Rejection | None:
        """Decide a request without Redis: None admits it (``ticket`` unreserved, its cost local)."""
        if rules.fail_mode == CLOSED:
            return refusals.unavailable()
        tenant, budget = ticket.tenant, rules.budget
        local = self.local(tenant)
        used = usage.last(tenant, ticket.day, ticket.month)
        if budget.enabled and not fits_share(budget, used, local, ticket.cost, peers):
            seen = usage.recorded(tenant)
            return refusals.budget(tenant, budget, (seen[1] if seen else 0) + local, now)
        if ticket.limits:
            refused = self._rates.admit(ticket.limits, ticket.tokens, peers, now * 1000)
            if refused is not None:
                index, wait = refused
                key, limit = ticket.limits[index]
                return refusals.rate(limit, refusals.which(tenant, model, refusals.kind_of(key)), wait, wait)
        ticket.reserved = False
        self._local[tenant] = local + ticket.cost
        return None

    def settled(self, ticket: Ticket, cost: int, tokens: int, peers: int) -> None:
        """A request admitted without Redis ended: its real cost and tokens, locally."""
        self.add(ticket.tenant, cost - ticket.cost)
        self._rates.correct(ticket.limits, tokens - ticket.tokens, peers)
