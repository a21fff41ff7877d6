"""The answers to a refused request: status, OpenAI-style error and headers (pure)."""

from __future__ import annotations

import calendar
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from sidecar.policy import budgets, ratelimit
from sidecar.policy.schema import Budget

# The reasons of ``tokenscaler_policy_rejections_total``.
MAX_TOKENS, BUDGET, RATE_LIMIT, REDIS_UNAVAILABLE = "max_tokens", "budget", "rate_limit", "redis_unavailable"
TENANT, PER_MODEL, WIDE = "tenant", "tenant-model", "model"  # the kinds of rate limit


@dataclass(frozen=True, slots=True)
class Rejection:
    status: int
    type: str
    code: str
    message: str
    headers: Mapping[str, str] = field(default_factory=dict)
    reason: str = ""  # the metric's label


def max_tokens(message: str) -> Rejection:
    return Rejection(400, "invalid_request_error", "max_tokens_above_ceiling", message, reason=MAX_TOKENS)


def unavailable() -> Rejection:
    return Rejection(
        503,
        "server_error",
        "policy_store_unavailable",
        "the token budget store is unreachable; try again shortly",
        {"Retry-After": "1"},
        REDIS_UNAVAILABLE,
    )


def which(tenant: str, model: str | None, kind: str) -> str:
    """The limit that refused, as the 429's message names it."""
    if kind == WIDE:
        return f"model {model} (all tenants)"
    if kind == PER_MODEL:
        return f"tenant {tenant} and model {model}"
    return f"tenant {tenant}"


def kind_of(local_key: str) -> str:
    """The kind of limit a local limiter key stands for (admission.reservation names them)."""
    if local_key.startswith("\1"):
        return WIDE
    return PER_MODEL if "\0" in local_key else TENANT


def rate(limit: ratelimit.Limit, which: str, wait_ms: float, reset_ms: float) -> Rejection:
    return Rejection(
        429,
        "tokens",
        "rate_limit_exceeded",
        f"Rate limit reached for {which} on tokens per min (TPM): "
        f"Limit {limit.tokens_per_minute}. Please try again in {ratelimit.duration(wait_ms)}.",
        {**ratelimit.headers(limit, 0, reset_ms), **ratelimit.retry_headers(wait_ms)},
        RATE_LIMIT,
    )


def budget(tenant: str, budget: Budget, month_used: int, now: float) -> Rejection:
    """The tenant's budget is spent (the monthly one when ``month_used`` reached it)."""
    monthly = budget.monthly is not None and month_used >= budget.monthly
    period = "monthly" if monthly else "daily"
    wait_s = period_end(now, monthly)
    return Rejection(
        429,
        "insufficient_quota",
        "budget_exceeded",
        f"tenant {tenant} has used its {period} {budget.unit} budget",
        {"Retry-After": str(max(1, int(wait_s)))},
        BUDGET,
    )


def period_end(now: float, monthly: bool) -> float:
    """Seconds until the budget period (UTC day or month) starts again."""
    if not monthly:
        return budgets.DAY_S - now % budgets.DAY_S
    t = time.gmtime(now)
    year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    return calendar.timegm((year, month, 1, 0, 0, 0)) - now
