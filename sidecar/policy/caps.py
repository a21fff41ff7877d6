"""max_tokens: the default injected, the ceiling, soft caps (pure).

A request without ``max_tokens`` (or ``max_completion_tokens``, ``max_output_tokens``) gets
the tenant's default; one above the tenant's ceiling is clamped to it or rejected. A soft
cap (a share of a budget used) lowers the ceiling further, and always clamps. Whatever
changed is said in the ``x-tokenscaler-max-tokens`` response header, never silently.
"""

from __future__ import annotations

from dataclasses import dataclass

from sidecar.policy.schema import REJECT, SoftCap, TenantPolicy

UNCHANGED, DEFAULT, CLAMPED, SOFT_CAP, SHORTFALL = "unchanged", "default", "clamped", "soft-cap", "budget"


@dataclass(frozen=True, slots=True)
class Cap:
    max_tokens: int  # per choice, as sent upstream
    action: str
    requested: int | None
    reject: str | None = None  # the message, when the request is refused

    def header(self) -> str:
        asked = "none" if self.requested is None else str(self.requested)
        return f"{self.max_tokens}; action={self.action}; requested={asked}"


def soft_cap(caps: tuple[SoftCap, ...], ratio: float) -> SoftCap | None:
    """The strongest soft cap reached at this share of a budget used (caps ascend by ``at``)."""
    found = None
    for cap in caps:
        if ratio >= cap.at:
            found = cap
    return found


def decide(tenant: TenantPolicy, requested: int | None, soft: SoftCap | None) -> Cap:
    rule = tenant.max_tokens
    if requested is None:
        value, action = rule.default, DEFAULT
    elif requested > rule.ceiling:
        if rule.over_ceiling == REJECT:
            return Cap(
                rule.ceiling,
                "rejected",
                requested,
                f"max_tokens {requested} is above this tenant's ceiling of {rule.ceiling}",
            )
        value, action = rule.ceiling, CLAMPED
    else:
        value, action = requested, UNCHANGED
    if soft is not None and soft.max_tokens is not None and value > soft.max_tokens:
        value, action = soft.max_tokens, SOFT_CAP
    return Cap(value, action, requested)


def shortened(cap: Cap, max_tokens: int) -> Cap:
    """The cap after a budget shortfall allowed only ``max_tokens`` per choice."""
    if max_tokens >= cap.max_tokens:
        return cap
    return Cap(max_tokens, SHORTFALL, cap.requested)
