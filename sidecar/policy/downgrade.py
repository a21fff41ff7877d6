"""Model downgrade: route a request for a large model to a cheaper one (pure).

A rule (``downgrade.<model>``) applies when the tenant has used ``atBudgetRatio`` of a
budget, or when ``whenSaturated`` and the scaler reports the workload saturated or at its
replica ceiling. Whitelisted tenants (``keepModel: true``) keep the model they asked for.
"""

from __future__ import annotations

from dataclasses import dataclass

from sidecar.policy.schema import Downgrade, TenantPolicy

BUDGET, SATURATED = "budget", "saturated"


@dataclass(frozen=True, slots=True)
class Route:
    model: str
    upstream: str | None
    reason: str

    def header(self, requested: str) -> str:
        return f"{self.model}; from={requested}; reason={self.reason}"


def decide(rule: Downgrade | None, tenant: TenantPolicy, ratio: float, saturated: bool) -> Route | None:
    if rule is None or tenant.keep_model:
        return None
    if rule.at is not None and ratio >= rule.at:
        return Route(rule.to, rule.upstream, BUDGET)
    if rule.when_saturated and saturated:
        return Route(rule.to, rule.upstream, SATURATED)
    return None
