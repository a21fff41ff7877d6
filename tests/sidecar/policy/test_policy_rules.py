"""The pure policy modules: the file's validation, identity, caps, downgrade, budgets, rate limits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sidecar import openai
from sidecar.openai import Kind
from sidecar.policy import budgets, caps, downgrade, identity, ratelimit
from sidecar.policy.schema import NANO, Downgrade, Price, SoftCap, TenantPolicy, load, parse
from token_scaler.errors import ConfigError
from token_scaler.saturation import NOT_SATURATED, Saturation, decode

EXAMPLE: dict[str, Any] = {
    "scope": "prod",
    "identity": {"apiKeys": {identity.key_digest("sk-1"): "acme"}},
    "prices": {"large": {"prompt": 0.001, "generation": 0.003}, "small": 0.0001},
    "downgrade": {"large": {"to": "small", "atBudgetRatio": 0.9, "whenSaturated": True}},
    "defaults": {
        "maxTokens": {"default": 256},
        "budget": {"unit": "money", "daily": 5, "monthly": 100},
        "rateLimit": {"tokensPerMinute": 60_000, "perModel": {"large": 20_000}},
        "softCaps": [{"atBudgetRatio": 0.9, "maxTokens": 64}, {"atBudgetRatio": 0.8, "rateFactor": 0.5}],
    },
    "tenants": {"vip": {"maxTokens": {"ceiling": 8192}, "keepModel": True, "budget": {"daily": 50}}},
}


def test_a_full_policy_parses_and_tenants_merge_over_defaults() -> None:
    policy = parse(EXAMPLE)
    vip, other = policy.tenant("vip"), policy.tenant("nobody")
    assert other is policy.defaults and other.max_tokens.ceiling == 1024
    assert (vip.max_tokens.default, vip.max_tokens.ceiling) == (256, 8192)
    assert (vip.budget.daily, vip.budget.monthly, vip.budget.unit) == (50 * NANO, 100 * NANO, "money")
    assert [c.at for c in vip.soft_caps] == [0.8, 0.9] and vip.keep_model and not other.keep_model
    assert policy.price("small") == Price(NANO // 10_000, NANO // 10_000)
    assert policy.price("unpriced") == policy.price("large")  # never free: the dearest
    assert policy.watches_saturation and policy.scope == "prod"


@pytest.mark.parametrize(
    ("doc", "path"),
    [
        ({"defaults": {"maxTokens": {"ceiling": 2048}}}, "defaults.maxTokens.ceiling"),
        ({"defaults": {"maxTokens": {"ceiling": 100, "default": 200}}}, "defaults.maxTokens.default"),
        ({"defaults": {"maxTokens": {"overCeiling": "truncate"}}}, "defaults.maxTokens.overCeiling"),
        ({"defaults": {"budget": {"daily": -1}}}, "defaults.budget.daily"),
        ({"defaults": {"budget": {"daily": "lots"}}}, "defaults.budget.daily"),
        ({"defaults": {"budget": {"unit": "money", "daily": 1}}}, "prices"),
        ({"defaults": {"budgets": {}}}, "defaults.budgets"),
        ({"defaults": {"rateLimit": {"perModel": {"m": 0}}}}, "defaults.rateLimit.perModel.m"),
        ({"defaults": {"softCaps": [{"maxTokens": 5}]}}, "defaults.softCaps[0].atBudgetRatio"),
        (
            {"defaults": {"budget": {"daily": 9}, "softCaps": [{"atBudgetRatio": 2}]}},
            "softCaps[0].atBudgetRatio",
        ),
        ({"tenants": {"a": {"budget": {"midStream": "later"}}}}, "tenants.a.budget.midStream"),
        ({"tenants": {"a b": {}}}, "tenants.a b"),
        ({"identity": {"apiKeys": {"sk-live-123": "a"}}}, "identity.apiKeys[#1]"),
        ({"downgrade": {"large": {"to": "small"}}}, "downgrade.large"),
        ({"downgrade": {"large": {"to": "small", "whenSaturated": True, "upstream": "ftp://x"}}}, "upstream"),
        ({"prices": {"m": {"prompt": 1}}}, "prices.m.generation"),
        ({"modelLimits": {"m": {"burstSeconds": 5}}}, "modelLimits.m.tokensPerMinute"),
        ({"modelLimits": {"m": {"tokensPerMinute": -1}}}, "modelLimits.m.tokensPerMinute"),
        ({"modelLimits": {"m": {"tokensPerMinute": 9, "burst": 1}}}, "modelLimits.m"),
        ({"reservationLeaseSeconds": 1}, "reservationLeaseSeconds"),
        ({"version": 2}, "version"),
        ({"budget": {}}, "policy.budget"),
        ([1, 2], "policy"),
    ],
)
def test_malformed_policies_name_the_key(doc: Any, path: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(doc)
    assert path in str(info.value)


def test_a_key_pasted_in_clear_is_not_echoed(tmp_path: Path) -> None:
    file = tmp_path / "p.yaml"
    file.write_text("identity:\n  apiKeys:\n    sk-live-secret: acme\n")
    with pytest.raises(ConfigError) as info:
        load(file)
    assert "sk-live-secret" not in str(info.value) and str(file) in str(info.value)
    file.write_text("defaults: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load(file)


def test_identity() -> None:
    policy = parse(EXAMPLE)
    assert (
        identity.tenant_of(policy, {"Authorization": "Bearer sk-1", "X-Tenant-ID": "vip"}, "X-Tenant-ID")
        == "acme"
    )
    assert identity.tenant_of(policy, {"api-key": "sk-1"}, "X-Tenant-ID") == "acme"
    assert identity.tenant_of(policy, {"Authorization": "Bearer sk-2"}, "X-Tenant-ID") == "default"
    assert identity.tenant_of(policy, {"X-Tenant-ID": "vip"}, "X-Tenant-ID") == "default"
    by_header = parse({"identity": {"tenantHeader": "X-Org"}})
    assert identity.tenant_of(by_header, {"X-Org": "vip", "X-Tenant-ID": "x"}, "X-Tenant-ID") == "vip"
    assert identity.tenant_of(by_header, {"X-Org": "{evil}"}, "X-Tenant-ID") == "default"
    assert identity.tenant_of(parse({}), {"X-Tenant-ID": "t1"}, "X-Tenant-ID") == "t1"


def test_caps() -> None:
    tenant = parse({"defaults": {"maxTokens": {"default": 100, "ceiling": 500}}}).defaults
    assert caps.decide(tenant, None, None) == caps.Cap(100, caps.DEFAULT, None)
    assert caps.decide(tenant, 900, None) == caps.Cap(500, caps.CLAMPED, 900)
    assert caps.decide(tenant, 50, None).action == caps.UNCHANGED
    assert caps.decide(tenant, 400, SoftCap(0.8, 64)) == caps.Cap(64, caps.SOFT_CAP, 400)
    assert caps.decide(tenant, 10, SoftCap(0.8, 64)).action == caps.UNCHANGED
    strict = parse({"defaults": {"maxTokens": {"overCeiling": "reject"}}}).defaults
    assert caps.decide(strict, 1025, None).reject is not None
    soft = (SoftCap(0.5, 200), SoftCap(0.8, 50))
    assert caps.soft_cap(soft, 0.4) is None and caps.soft_cap(soft, 0.85) == soft[1]
    assert caps.shortened(caps.Cap(100, caps.DEFAULT, None), 40) == caps.Cap(40, caps.SHORTFALL, None)
    assert caps.Cap(100, caps.CLAMPED, 900).header() == "100; action=clamped; requested=900"


def test_downgrade() -> None:
    rule = Downgrade("large", "small", None, at=0.9, when_saturated=True)
    normal, vip = TenantPolicy(), TenantPolicy(keep_model=True)
    assert downgrade.decide(rule, normal, 0.5, False) is None
    assert downgrade.decide(rule, normal, 0.95, False) == downgrade.Route("small", None, "budget")
    assert downgrade.decide(rule, normal, 0.0, True) == downgrade.Route("small", None, "saturated")
    assert downgrade.decide(rule, vip, 1.0, True) is None
    assert downgrade.decide(None, normal, 1.0, True) is None


def test_budget_arithmetic() -> None:
    policy = parse(EXAMPLE)
    money, price = policy.defaults.budget, policy.price("large")
    # 1000 prompt tokens at $0.001/1k + 500 generated at $0.003/1k = $0.0025
    assert budgets.cost(money, price, 1000, 500) == 2_500_000
    assert budgets.cost(money, price, 1, 0) == 1_000  # rounded up, never down
    assert budgets.generation_allowed(money, price, 2_500_000, 1000, 1) == 500
    tokens = parse({"defaults": {"budget": {"daily": 10}}}).defaults.budget
    assert budgets.cost(tokens, price, 3, 4) == 7
    assert budgets.generation_allowed(tokens, price, 100, 40, 3) == 20
    assert budgets.generation_allowed(tokens, price, 30, 40, 1) == 0
    assert budgets.periods(1_738_367_999.0) == ("20250131", "202501")
    assert budgets.used_ratio(tokens, 5, 0) == 0.5


def test_rate_limit_parameters_and_headers() -> None:
    limit = ratelimit.Limit.of(60_000, 60, factor=0.5)
    assert (limit.tokens_per_minute, limit.interval_ms, limit.tau_ms) == (30_000, 2.0, 60_000.0)
    assert [ratelimit.duration(ms) for ms in (0.2, 20, 1500, 360_000)] == ["1ms", "20ms", "1.5s", "6m0s"]
    assert ratelimit.retry_headers(1200) == {"Retry-After": "2", "retry-after-ms": "1200"}
    assert ratelimit.headers(limit, -3, 10)["x-ratelimit-remaining-tokens"] == "0"


def test_local_limiter_takes_a_share_and_all_or_nothing() -> None:
    tenant = ratelimit.Limit.of(600, 1)  # 100 ms per token, 1 s burst
    model = ratelimit.Limit.of(6_000, 1)  # 10 ms per token
    local = ratelimit.LocalLimiter()
    both = [("t", tenant), ("t\0m", model)]
    # Two peers: 200 ms per token for the tenant, 20 ms for the model; 1,000 ms of burst.
    assert local.admit([("t\0m", model)], 50, 2, now_ms=0) is None  # the model's burst spent
    # The model limit refuses: the tenant limit is not charged either.
    assert local.admit(both, 1, 2, now_ms=0) == (1, 20.0)
    assert local.admit(both, 1, 2, now_ms=20) is None
    assert local.admit([("t", tenant)], 4, 2, now_ms=20) is None  # 1 + 4 tokens: 1,000 ms
    assert local.admit([("t", tenant)], 1, 2, now_ms=20) == (0, 200.0)
    # A request larger than the burst passes when nothing is owed, as in Redis.
    assert local.admit([("x", tenant)], 50, 1, now_ms=0) is None
    # The real usage was smaller: the difference is given back.
    local.correct([("x", tenant)], -45, 1)
    assert local.admit([("x", tenant)], 5, 1, now_ms=0) is None


def test_request_rewrites_and_stop_events() -> None:
    body = b'{"model":"large","messages":[],"max_completion_tokens":900}'
    assert openai.rewritten(Kind.CHAT, body, max_tokens=100, model="small") == (
        b'{"model":"small","messages":[],"max_completion_tokens":100}'
    )
    assert b'"max_tokens":64' in openai.rewritten(Kind.CHAT, b'{"model":"m"}', max_tokens=64)
    assert b'"max_output_tokens":64' in openai.rewritten(Kind.RESPONSES, b'{"model":"m"}', max_tokens=64)
    assert openai.rewritten(Kind.CHAT, b"[1]", max_tokens=1) == b"[1]"
    error = openai.stop_event(Kind.CHAT, "error", "budget")
    assert error.startswith(b'data: {"error":') and error.endswith(b"data: [DONE]\n\n")
    assert b'"finish_reason":"length"' in openai.stop_event(Kind.COMPLETIONS, "finish", "budget")
    assert openai.stop_event(Kind.RESPONSES, "error", "budget").startswith(b"event: error\n")


def test_saturation_signal() -> None:
    signal = Saturation(True, "max-replicas", 24, 20, 1_000_000)
    assert decode(signal.encode(), 1_010_000) == signal
    assert decode(signal.encode(), 1_040_001) == NOT_SATURATED  # stale
    for raw in (None, b"{", b'{"v":2,"ts":1,"saturated":true}', b'{"v":1,"ts":"x","saturated":true}'):
        assert decode(raw, 0) == NOT_SATURATED


def test_the_budget_shares_remembered_stay_bounded() -> None:
    from prometheus_client import CollectorRegistry

    from sidecar.policy.metrics import PolicyMetrics
    from sidecar.policy.schema import Budget, Price
    from sidecar.policy.store import tenant_keys
    from sidecar.policy.tickets import Ticket
    from sidecar.policy.usage import Usage

    registry = CollectorRegistry()
    usage = Usage(PolicyMetrics(registry), str, lambda tenant: 0, max_tenants=3)
    budget = Budget(daily=100)

    def of(tenant: str, day: str) -> Ticket:
        return Ticket(
            id="x", keys=tenant_keys("s", tenant, day, "202611", None), tenant=tenant, day=day,
            month="202611", budget=budget, price=Price(0, 0), tenant_interval=0.0, model_interval=0.0,
            cost=0, reserved=True,
        )  # fmt: skip

    for tenant in ("a", "b", "c"):
        usage.saw(of(tenant, "20261126"), 10, 10)
    usage.saw(of("c", "20261127"), 20, 20)  # known: nothing forgotten
    assert sorted(usage.tenants()) == ["a", "b", "c"]
    usage.saw(of("d", "20261127"), 5, 5)  # a fourth: yesterday's go
    assert sorted(usage.tenants()) == ["c", "d"]
    assert usage.last("d", "20261127", "202611") == (5, 5)
    assert usage.last("d", "20261128", "202612") == (0, 0)  # another day and month: nothing yet
    assert registry.get_sample_value("tokenscaler_budget_used_ratio", {"tenant": "d"}) == 0.05
