"""When Redis counts as unreachable, and what fail-open may spend meanwhile.

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
from collections.abc import AsyncIterator

from sidecar.policy.schema import Budget

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
