"""Reservations in Redis: asked for, read, and given back when refused.

A request's reservation (``admit.lua``) and its model's limit across tenants
(``model_rate.lua``) are queued in one write. When one of the two refuses and the other
took its part, that part is given back: a release of the reservation (with the next write),
or a move of the model's limit by minus the tokens.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable

from sidecar.policy.admission import Limits
from sidecar.policy.context import Context
from sidecar.policy.scripts import Admit
from sidecar.policy.settlement import Corrections, Settlement, Settlements
from sidecar.policy.store import Admitted, ModelAdmitted
from sidecar.policy.tickets import Ticket
from sidecar.policy.upkeep import RedisClock
from sidecar.policy.usage import Usage

log = logging.getLogger(__name__)


class Reserver:
    def __init__(
        self,
        ctx: Context,
        redis_clock: RedisClock,
        usage: Usage,
        settlements: Settlements,
        corrections: Corrections,
        label: Callable[[str], str],
        prefix: str,
    ) -> None:
        self._ctx = ctx
        self._redis_clock = redis_clock
        self._usage = usage
        self._settlements = settlements
        self._corrections = corrections
        self._label = label
        self._prefix = prefix
        self._ids = itertools.count()

    def new_id(self) -> str:
        """A reservation id, unique: the sidecar's random prefix and a count."""
        return f"{self._prefix}.{next(self._ids):x}"

    async def ask(
        self, ticket: Ticket, least: int, limits: Limits, *, waiting: bool = True
    ) -> tuple[Admitted, ModelAdmitted | None]:
        """Reserve ``ticket`` in Redis, and the model's limit across tenants in the same write
        (at once when a request is ``waiting`` on it)."""
        budget = ticket.budget
        taken = None
        if limits.wide is not None and ticket.wide_key is not None:
            taken = self._ctx.store.model_rate(
                ticket.wide_key, ticket.tokens, limits.wide.interval_ms, limits.wide.tau_ms
            )
        admitted = self._ctx.store.admit(
            ticket.keys,
            id=ticket.id,
            cost=ticket.cost,
            day_limit=budget.daily or 0,
            month_limit=budget.monthly or 0,
            least=least,
            tokens=ticket.tokens,
            tenant_rate=(ticket.tenant_interval, limits.tenant.tau_ms if limits.tenant else 0.0),
            model_rate=(ticket.model_interval, limits.model.tau_ms if limits.model else 0.0),
            lease_ms=int(self._ctx.file.policy.lease_s * 1000),
            day=ticket.day,
            month=ticket.month,
            flush=waiting,
        )
        if taken is None:
            return await admitted, None
        reply, wide_reply = await asyncio.gather(admitted, taken)  # both in one write
        return reply, wide_reply

    def noted(self, reply: Admitted, ticket: Ticket) -> None:
        """What every admission reply tells: Redis' clock, leases that ended, the budget used."""
        self._redis_clock.saw(reply.redis_time_ms)
        if reply.expired:
            self._ctx.metrics.expired.labels(self._label(ticket.tenant)).inc(reply.expired)
            log.warning(
                "released %d reservation(s) of tenant %s whose lease ended (a sidecar that died "
                "mid-request, or one stalled past reservationLeaseSeconds)",
                reply.expired,
                ticket.tenant,
            )
        self._usage.saw(ticket, reply.day_used, reply.month_used)

    def refused(self, ticket: Ticket, reply: Admitted, wide_reply: ModelAdmitted | None) -> bool:
        """Whether the tenant's check or the model's across tenants refused; if one did, what
        the other took is given back."""
        wide_refused = wide_reply is not None and wide_reply.refused
        if reply.status == Admit.OK and not wide_refused:
            return False
        if reply.status == Admit.OK:  # the tenant's reservation went through: released with the next write
            self._settlements.post(Settlement(ticket, 0, 0, moved=True))
        elif wide_reply is not None and not wide_refused:  # the model's limit took the tokens
            assert ticket.wide_key is not None
            self._corrections.move(ticket.wide_key, -ticket.tokens * ticket.wide_interval)
        return True
