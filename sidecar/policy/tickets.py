"""What an admitted request holds until it is settled (pure data)."""

from __future__ import annotations

from dataclasses import dataclass, field

from sidecar.policy import ratelimit
from sidecar.policy.schema import Budget, Price
from sidecar.policy.store import TenantKeys


@dataclass(slots=True)
class Ticket:
    """What the settlement of one admitted request (or a chunk, chunks.py) needs."""

    id: str
    keys: TenantKeys
    tenant: str
    day: str
    month: str
    budget: Budget
    price: Price
    tenant_interval: float
    model_interval: float
    cost: int  # reserved (granted)
    reserved: bool  # in Redis; False: admitted without it (fail-open)
    tokens: int = 0  # reserved tokens (prompt estimate + max_tokens x n)
    limits: list[tuple[str, ratelimit.Limit]] = field(default_factory=list)  # (local key, limit)
    wide_key: str | None = None  # the model's limit across tenants, when it has one
    wide_interval: float = 0.0
