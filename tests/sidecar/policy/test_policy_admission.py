"""The admission decision, pure: no Redis, no clock, no engine."""

from __future__ import annotations

import json
from typing import Any

from sidecar import openai
from sidecar.openai import Kind, ParsedRequest
from sidecar.policy import admission, caps
from sidecar.policy.admission import Admission
from sidecar.policy.schema import parse
from sidecar.policy.scripts import Admit
from sidecar.policy.store import Admitted, ModelAdmitted

POLICY: dict[str, Any] = {
    "scope": "s",
    "prices": {"large": {"prompt": 0.001, "generation": 0.003}, "small": 0.0001},
    "downgrade": {"large": {"to": "small", "atBudgetRatio": 0.9}},
    "modelLimits": {"large": {"tokensPerMinute": 6_000}},
    "defaults": {
        "maxTokens": {"default": 100, "ceiling": 1000},
        "budget": {"daily": 10_000, "onShortfall": "shorten", "minTokens": 10},
        "rateLimit": {"tokensPerMinute": 60_000, "perModel": {"small": 6_000}},
        "softCaps": [{"atBudgetRatio": 0.5, "maxTokens": 40, "rateFactor": 0.5}],
    },
}
NOW = 1_767_225_600.0 + 3600  # 2026-01-01 01:00 UTC


def request(max_tokens: int | None = None, model: str = "large", n: int = 1) -> ParsedRequest:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "hi"}], "n": n}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    parsed = openai.parse_request(Kind.CHAT, json.dumps(body).encode())
    assert parsed is not None
    return parsed


def reply(status: Admit = Admit.OK, granted: int = 0, **fields: int) -> Admitted:
    values = dict(day_used=0, month_used=0, retry_after_ms=0, reset_ms=0, model_reset_ms=0)
    values.update(fields)
    return Admitted(status, granted, redis_time_ms=0, expired=0, **values)


def test_the_budget_share_seen_sets_soft_caps_and_downgrades() -> None:
    policy = parse(POLICY)
    rules = policy.tenant("t")
    fresh = admission.decide(policy, rules, request(), 0.1, saturated=False)
    assert fresh.model == "large" and fresh.route is None and fresh.soft is None
    assert fresh.cap is not None and fresh.cap.max_tokens == 100 and fresh.rejection is None
    spent = admission.decide(policy, rules, request(), 0.95, saturated=False)
    assert spent.model == "small" and spent.route is not None and spent.route.reason == "budget"
    assert spent.cap is not None and spent.cap.max_tokens == 40 and spent.cap.action == caps.SOFT_CAP
    assert admission.needs_redis(policy, spent)


def test_a_max_tokens_above_the_ceiling_is_refused_before_any_reservation() -> None:
    policy = parse({**POLICY, "defaults": {"maxTokens": {"ceiling": 50, "overCeiling": "reject"}}})
    decision = admission.decide(policy, policy.tenant("t"), request(max_tokens=500), 0.0, saturated=False)
    assert decision.rejection is not None and decision.rejection.status == 400
    assert decision.rejection.reason == "max_tokens"


def test_a_reservation_names_its_keys_limits_and_least_grant() -> None:
    policy = parse(POLICY)
    decision = admission.decide(policy, policy.tenant("t"), request(model="small", n=2), 0.0, False)
    plan = admission.reservation(policy, decision, "t", 2, 30, NOW, "id.1")
    ticket = plan.ticket
    assert (ticket.day, ticket.month) == ("20260101", "202601")
    assert ticket.keys.day.endswith("{policy:s:t}:budget:d:20260101")
    assert ticket.keys.model_rate.endswith(":rate:m:small")
    assert ticket.tokens == 30 + 100 * 2 and plan.cost == ticket.cost
    assert plan.least > 0 and plan.least < plan.cost  # onShortfall: shorten
    assert plan.limits.tenant is not None and plan.limits.model is not None and plan.limits.wide is None
    assert [key for key, _ in ticket.limits] == ["t", "t\0small"] and ticket.wide_key is None


def test_the_reply_refusing_names_the_limit_that_did() -> None:
    policy = parse(POLICY)
    decision = admission.decide(policy, policy.tenant("t"), request(), 0.0, False)
    plan = admission.reservation(policy, decision, "t", 1, 30, NOW, "id.2")
    assert plan.limits.wide is not None and plan.ticket.wide_key is not None
    budget = admission.refusal(decision, "t", plan.limits, reply(Admit.BUDGET), None, NOW)
    assert (budget.status, budget.code, budget.reason) == (429, "budget_exceeded", "budget")
    assert int(budget.headers["Retry-After"]) == 23 * 3600  # the UTC day's end
    tenant = admission.refusal(
        decision, "t", plan.limits, reply(Admit.RATE_TENANT, retry_after_ms=1500), None, NOW
    )
    assert tenant.code == "rate_limit_exceeded" and "for tenant t on" in tenant.message
    assert tenant.headers["retry-after-ms"] == "1500"
    wide = admission.refusal(decision, "t", plan.limits, reply(), ModelAdmitted(True, 300, 900), NOW)
    assert "model large (all tenants)" in wide.message and wide.headers["retry-after-ms"] == "300"


def test_a_short_grant_shortens_the_cap_and_headers_show_the_tenant_limit() -> None:
    policy = parse(POLICY)
    decision = admission.decide(policy, policy.tenant("t"), request(), 0.0, False)
    plan = admission.reservation(policy, decision, "t", 1, 30, NOW, "id.3")
    granted = plan.cost // 2
    cap = admission.shortened(decision.cap, plan.ticket.budget, plan.ticket.price, granted, plan.cost, 30, 1)
    assert cap is not None and decision.cap is not None and 0 < cap.max_tokens < decision.cap.max_tokens
    assert admission.shortened(
        decision.cap, plan.ticket.budget, plan.ticket.price, plan.cost, plan.cost, 30, 1
    ) is (decision.cap)
    headers = admission.rate_headers(plan.limits, reply(reset_ms=1000), ModelAdmitted(False, 0, 5000))
    assert headers["x-ratelimit-limit-tokens"] == "60000"  # the tenant's wins
    body = json.dumps({"model": "large", "messages": [{"role": "user", "content": "hi"}]}).encode()
    parsed = openai.parse_request(Kind.CHAT, body)
    assert parsed is not None
    result = Admission("t", body, decision.model, None)
    assert admission.complete(result, decision, cap, parsed, body)  # the cap changed max_tokens
    assert result.max_tokens == cap.max_tokens and cap.action == caps.SHORTFALL
    assert json.loads(result.body)["max_tokens"] == cap.max_tokens
    assert result.headers["x-tokenscaler-max-tokens"] == cap.header()
