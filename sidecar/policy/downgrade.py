"""Model downgrade: route a request for a large model to a cheaper one (pure).

A rule (``downgrade.<model>``) applies when the tenant has used ``atBudgetRatio`` of a
budget, when ``whenSaturated`` and the scaler reports the workload saturated or at its
replica ceiling, when the scope's hourly spend passed ``spendGuard.atSpendRatio``
(spend.py), or when ``whenBusy`` and the model server has stayed busy (busy.py).
Whitelisted tenants (``keepModel: true``) keep the model they asked for.
"""

from __future__ import annotations

from dataclasses import dataclass

from sidecar.policy.schema import Downgrade, TenantPolicy

BUDGET, SATURATED, SPEND, BUSY = "budget", "saturated", "spend", "busy"


@dataclass(frozen=True, slots=True)
class Route:
    model: str
    upstream: str | None
    reason: str

    def header(self, requested: str) -> str:
        return f"{self.model}; from={requested}; reason={self.reason}"


def decide(
    rule: Downgrade | None,
    tenant: TenantPolicy,
    ratio: float,
    saturated: bool,
    *,
    spend: bool = False,
    busy: bool = False,
) -> Route | None:
    """``spend``: the spend guard downgrades; ``busy``: the rule's ``whenBusy`` is in force."""
    if rule is None or tenant.keep_model:
        return None
    if rule.at is not None and ratio >= rule.at:
        return Route(rule.to, rule.upstream, BUDGET)
    if spend:
        return Route(rule.to, rule.upstream, SPEND)
    if rule.when_saturated and saturated:
        return Route(rule.to, rule.upstream, SATURATED)
    if rule.when_busy is not None and busy:
        return Route(rule.to, rule.upstream, BUSY)
    return None
