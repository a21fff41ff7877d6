"""The admission decision (pure): what a request may ask for, and what Redis' reply means.

``decide`` applies the tenant's rules to the request (max_tokens caps, soft caps and
downgrades on the budget share last seen); ``reservation`` says what to reserve and under
which rate limits; ``refusal``, ``rate_headers`` and ``shortened`` read the reservation's
reply; ``complete`` writes the decision into the request sent upstream. No I/O and no
clock: the engine passes the time, the usage seen and the replies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from sidecar import openai
from sidecar.openai import Kind, ParsedRequest
from sidecar.policy import budgets, caps, downgrade, ratelimit, refusals
from sidecar.policy.chunks import Chunk
from sidecar.policy.refusals import PER_MODEL, TENANT, WIDE, Rejection
from sidecar.policy.schema import MID_OFF, SHORTEN, Budget, Policy, Price, SoftCap, TenantPolicy
from sidecar.policy.scripts import Admit
from sidecar.policy.store import Admitted, ModelAdmitted, model_rate_key, tenant_keys
from sidecar.policy.tickets import Ticket


@dataclass(slots=True)
class Admission:
    tenant: str
    body: bytes
    model: str | None  # as sent upstream
    max_tokens: int | None  # per choice, as sent upstream
    upstream: str | None = None  # another model server (a downgrade rule's ``upstream``)
    headers: dict[str, str] = field(default_factory=dict)  # added to the response
    rejection: Rejection | None = None
    stream_limit: int | None = None  # generated pieces after which a stream is ended
    stream_mode: str = MID_OFF
    ticket: Ticket | None = None
    chunk: Chunk | None = None  # drawn from a chunk reserved ahead (chunks.py)


@dataclass(frozen=True, slots=True)
class Decision:
    rules: TenantPolicy
    soft: SoftCap | None
    route: downgrade.Route | None
    model: str | None  # as sent upstream
    cap: caps.Cap | None  # None: no max_tokens (embeddings)
    rejection: Rejection | None


class Limits(NamedTuple):
    """The rate limits in force: the tenant's, the tenant's on the model, the model's across tenants."""

    tenant: ratelimit.Limit | None
    model: ratelimit.Limit | None
    wide: ratelimit.Limit | None


@dataclass(slots=True)
class Reservation:
    ticket: Ticket
    cost: int  # asked for (the ticket's cost becomes what is granted)
    least: int  # the least grant worth taking (``onShortfall: shorten``), else 0
    limits: Limits


def decide(
    policy: Policy,
    rules: TenantPolicy,
    parsed: ParsedRequest,
    ratio: float,
    saturated: bool,
    *,
    spend: bool = False,
    busy: frozenset[str] = frozenset(),
) -> Decision:
    """The tenant's rules on the request; ``ratio``: its budget share used, as last seen;
    ``spend``: the spend guard downgrades; ``busy``: the models whose ``whenBusy`` is in force."""
    soft = caps.soft_cap(rules.soft_caps, ratio) if rules.soft_caps else None
    requested = parsed.model
    route = None
    if requested is not None and requested in policy.downgrades:
        route = downgrade.decide(
            policy.downgrades[requested], rules, ratio, saturated, spend=spend, busy=requested in busy
        )
    model = route.model if route is not None else requested
    cap = rejection = None
    if parsed.kind is not Kind.EMBEDDINGS:
        cap = caps.decide(rules, parsed.max_tokens, soft)
        if cap.reject is not None:
            rejection = refusals.max_tokens(cap.reject)
    return Decision(rules, soft, route, model, cap, rejection)


def needs_redis(policy: Policy, decision: Decision) -> bool:
    """A budget or a rate limit applies: the request reserves."""
    model = decision.model
    return decision.rules.needs_redis or (model is not None and model in policy.model_limits)


def reservation(
    policy: Policy,
    decision: Decision,
    tenant: str,
    n: int,
    prompt: int,
    now: float,
    id: str,
) -> Reservation:
    """What to reserve for a request: its budget cost (prompt estimate + max_tokens x ``n``)
    and tokens under each rate limit, on Redis' clock ``now``."""
    rules, model, cap, soft = decision.rules, decision.model, decision.cap, decision.soft
    budget, rate = rules.budget, rules.rate_limit
    generation = cap.max_tokens * n if cap is not None else 0
    price = policy.price(model or "")
    cost = budgets.cost(budget, price, prompt, generation)
    least = 0
    if budget.on_shortfall == SHORTEN and cap is not None:
        least = budgets.cost(budget, price, prompt, min(budget.min_tokens, cap.max_tokens) * n)
    factor = soft.rate_factor if soft is not None else 1.0
    tenant_limit = model_limit = None
    if rate.tokens_per_minute is not None:
        tenant_limit = ratelimit.Limit.of(rate.tokens_per_minute, rate.burst_seconds, factor)
    model_tpm = rate.per_model.get(model) if model is not None else None
    if model_tpm is not None:
        model_limit = ratelimit.Limit.of(model_tpm, rate.burst_seconds, factor)
    wide = policy.model_limits.get(model) if model is not None else None
    wide_limit = ratelimit.Limit.of(wide.tokens_per_minute, wide.burst_seconds) if wide else None
    day, month = budgets.periods(now)
    # Local keys (fail-open): the tenant, the tenant and model, and the model ("\1").
    limits = [(tenant, tenant_limit)] if tenant_limit else []
    if model_limit:
        limits.append((f"{tenant}\0{model}", model_limit))
    if wide_limit:
        limits.append((f"\1{model}", wide_limit))
    ticket = Ticket(
        id=id,
        keys=tenant_keys(policy.scope, tenant, day, month, model if model_limit else None),
        tenant=tenant,
        day=day,
        month=month,
        budget=budget,
        price=price,
        tenant_interval=tenant_limit.interval_ms if tenant_limit else 0.0,
        model_interval=model_limit.interval_ms if model_limit else 0.0,
        cost=cost,
        reserved=True,
        tokens=prompt + generation,
        limits=limits,
        wide_key=model_rate_key(policy.scope, model) if wide_limit and model else None,
        wide_interval=wide_limit.interval_ms if wide_limit else 0.0,
    )
    return Reservation(ticket, cost, least, Limits(tenant_limit, model_limit, wide_limit))


def refusal(
    decision: Decision,
    tenant: str,
    limits: Limits,
    reply: Admitted,
    wide_reply: ModelAdmitted | None,
    now: float,
) -> Rejection:
    """The answer to a request Redis refused: its budget, or the limit that did."""
    model = decision.model
    if reply.status == Admit.BUDGET:
        return refusals.budget(tenant, decision.rules.budget, reply.month_used, now)
    if reply.status != Admit.OK:
        per_model = reply.status != Admit.RATE_TENANT
        limit = limits.model if per_model else limits.tenant
        assert limit is not None
        which = refusals.which(tenant, model, PER_MODEL if per_model else TENANT)
        return refusals.rate(limit, which, reply.retry_after_ms, reply.reset_ms)
    assert wide_reply is not None and limits.wide is not None
    which = refusals.which(tenant, model, WIDE)
    return refusals.rate(limits.wide, which, wide_reply.retry_after_ms, wide_reply.reset_ms)


def resets(
    limits: Limits, reply: Admitted, wide_reply: ModelAdmitted | None
) -> list[tuple[ratelimit.Limit, float]]:
    """Each limit in force with its reset (ms) from the admission's replies: the model's
    first, the tenant's last (it wins in the headers when several are set)."""
    found = (
        (limits.wide, wide_reply.reset_ms if wide_reply else 0),
        (limits.model, reply.model_reset_ms),
        (limits.tenant, reply.reset_ms),
    )
    return [(limit, float(reset)) for limit, reset in found if limit is not None]


def rate_headers(limits: Limits, reply: Admitted, wide_reply: ModelAdmitted | None) -> dict[str, str]:
    """The rate-limit headers of an admitted request (the tenant's limit wins)."""
    headers: dict[str, str] = {}
    for limit, reset in resets(limits, reply, wide_reply):
        remaining = int((limit.tau_ms - reset) / limit.interval_ms)
        headers.update(ratelimit.headers(limit, remaining, reset))
    return headers


def shortened(
    cap: caps.Cap | None, budget: Budget, price: Price, granted: int, asked: int, prompt: int, n: int
) -> caps.Cap | None:
    """The cap a reservation granted short of what it ``asked`` for still pays for."""
    if cap is None or granted >= asked:
        return cap
    allowed = budgets.generation_allowed(budget, price, granted, prompt, n)
    return caps.shortened(cap, max(1, allowed))


def complete(
    admission: Admission, decision: Decision, cap: caps.Cap | None, parsed: ParsedRequest, body: bytes
) -> bool:
    """Write the cap and the route into the request sent upstream and the response's
    headers; whether the cap changed max_tokens."""
    changed_cap = cap is not None and cap.action != caps.UNCHANGED
    if cap is not None:
        admission.max_tokens = cap.max_tokens
        if changed_cap:
            admission.headers["x-tokenscaler-max-tokens"] = cap.header()
        budget = decision.rules.budget
        if parsed.stream and budget.enabled and budget.mid_stream != MID_OFF:
            admission.stream_limit = cap.max_tokens * parsed.n
            admission.stream_mode = budget.mid_stream
    route, requested = decision.route, parsed.model
    if route is not None and requested is not None:
        admission.upstream = route.upstream
        admission.headers["x-tokenscaler-model"] = route.header(requested)
    if changed_cap or route is not None:
        admission.body = openai.rewritten(
            parsed.kind,
            body,
            max_tokens=cap.max_tokens if changed_cap and cap is not None else None,
            model=route.model if route is not None else None,
            layout=parsed.layout,
        )
    return changed_cap
