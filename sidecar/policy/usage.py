"""The budget each tenant has used, as this sidecar last saw it (every Redis reply carries it).

Soft caps and budget-share downgrades act on it (at most one request behind), fail-open
spends a share of what it says is left, chunks are sized within it, and
``tokenscaler_budget_used_ratio`` shows it. The budget itself is exact: reservations are
atomic in Redis.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import Gauge

from sidecar.policy import budgets
from sidecar.policy.metrics import PolicyMetrics
from sidecar.policy.schema import Budget
from sidecar.policy.tickets import Ticket

MAX_TENANTS_SEEN = 100_000  # budget shares remembered for soft caps and downgrades


@dataclass(slots=True)
class _Used:
    day: str
    month: str
    day_used: int
    month_used: int


class Usage:
    """``unused``: the cost a tenant's chunks hold undrawn here (not spent: it comes back)."""

    def __init__(
        self,
        metrics: PolicyMetrics,
        label: Callable[[str], str],
        unused: Callable[[str], int],
        *,
        max_tenants: int = MAX_TENANTS_SEEN,
    ) -> None:
        self._metrics = metrics
        self._label = label
        self._unused = unused
        self._max_tenants = max_tenants
        self._used: dict[str, _Used] = {}
        self._gauges: dict[str, Gauge] = {}

    def tenants(self) -> list[str]:
        """The tenants remembered."""
        return list(self._used)

    def recorded(self, tenant: str) -> tuple[int, int] | None:
        """The day's and month's budget used as last seen, whichever periods those were."""
        seen = self._used.get(tenant)
        return None if seen is None else (seen.day_used, seen.month_used)

    def last(self, tenant: str, day: str, month: str) -> tuple[int, int] | None:
        """The tenant's budget used in this day and month as last seen (None: never seen)."""
        seen = self._used.get(tenant)
        if seen is None:
            return None
        return (seen.day_used if seen.day == day else 0, seen.month_used if seen.month == month else 0)

    def ratio(self, tenant: str, budget: Budget, day: str, month: str, local: int) -> float:
        """The share of the budget used; ``local``: cost admitted here without Redis since."""
        if not budget.enabled:
            return 0.0
        day_used, month_used = self.last(tenant, day, month) or (0, 0)
        spent = local - self._unused(tenant)
        return budgets.used_ratio(budget, day_used + spent, month_used + spent)

    def left(self, ticket: Ticket) -> int | None:
        """What the tenant had left when last seen (0 before any reply; None: no budget)."""
        budget = ticket.budget
        if not budget.enabled:
            return None
        seen = self.last(ticket.tenant, ticket.day, ticket.month)
        if seen is None:
            return 0
        left = []
        if budget.daily:
            left.append(budget.daily - seen[0])
        if budget.monthly:
            left.append(budget.monthly - seen[1])
        return min(left) if left else None

    def saw(self, ticket: Ticket, day_used: int, month_used: int) -> None:
        """A reply's budget used, for the ticket's tenant and periods."""
        tenant, budget, day, month = ticket.tenant, ticket.budget, ticket.day, ticket.month
        if not budget.enabled:
            return
        if len(self._used) >= self._max_tenants and tenant not in self._used:
            # Tenants come from requests: keep today's, forget older ones (at worst a soft cap
            # acts one request late for a tenant forgotten here).
            self._used = {t: u for t, u in self._used.items() if u.day == day}
            if len(self._used) >= self._max_tenants:
                self._used.clear()
        self._used[tenant] = _Used(day, month, day_used, month_used)
        gauge = self._gauges.get(tenant)
        if gauge is None:  # labels() looks the child up by its label values: once per tenant
            if len(self._gauges) > self._max_tenants:  # tenants come from requests: bounded
                self._gauges.clear()
            gauge = self._gauges[tenant] = self._metrics.budget_used.labels(self._label(tenant))
        unused = self._unused(tenant)
        gauge.set(budgets.used_ratio(budget, day_used - unused, month_used - unused))
