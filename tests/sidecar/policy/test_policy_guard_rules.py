"""The spend guard's and the busy trigger's configuration and decisions, without I/O."""

from __future__ import annotations

from typing import Any

import pytest

from sidecar.policy import schema, spend
from sidecar.policy.busy import Hysteresis, gpu_util
from sidecar.policy.schema import GPU_UTIL, KV_CACHE, WAITING, Busy, Threshold
from token_scaler.errors import ConfigError

BASE: dict[str, Any] = {
    "prices": {"big": {"prompt": 0.001, "generation": 0.002}, "small": 0.0001},
    "downgrade": {"big": {"to": "small"}},
    "spendGuard": {"perHour": 10, "atSpendRatio": 0.8},
}


def with_(**changes: Any) -> dict[str, Any]:
    doc = {**BASE, **changes}
    return {k: v for k, v in doc.items() if v is not None}


def test_spend_guard_parses_to_billionths() -> None:
    policy = schema.parse(with_(spendGuard={"perHour": 12.5, "atSpendRatio": 0.75, "action": "refuse"}))
    assert policy.spend_guard == schema.SpendGuard(12_500_000_000, 0.75, "refuse")
    assert schema.parse(with_()).spend_guard == schema.SpendGuard(10_000_000_000, 0.8, "downgrade")


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (with_(spendGuard={"perHour": "lots"}), "spendGuard.perHour: expected a number, got 'lots'"),
        (with_(spendGuard={"perHour": 0}), "spendGuard.perHour: expected an amount of money above 0, got 0"),
        (with_(spendGuard={"atSpendRatio": 0.5}), "spendGuard.perHour: required"),
        (
            with_(spendGuard={"perHour": 5, "atSpendRatio": 1.5}),
            "spendGuard.atSpendRatio: expected a finite number from 0 to 1, got 1.5",
        ),
        (
            with_(spendGuard={"perHour": 5, "action": "explode"}),
            "spendGuard.action: expected one of downgrade, refuse, got 'explode'",
        ),
        (with_(spendGuard={"perHour": 5, "budget": 3}), "spendGuard.budget: unknown key"),
        (with_(prices=None), "prices: required with spendGuard"),
        (with_(downgrade=None), "spendGuard.atSpendRatio: 0.8 acts on the models that have a downgrade rule"),
        (with_(spendGuard=None), "downgrade.big: says none of atBudgetRatio, whenSaturated, whenBusy"),
        (
            with_(downgrade={"big": {"to": "small", "whenBusy": {"gpuUtilAbove": 0.9, "gpuUtilBelow": 0.9}}}),
            "downgrade.big.whenBusy.gpuUtilBelow: 0.9 is not below gpuUtilAbove (0.9): no hysteresis",
        ),
        (
            with_(downgrade={"big": {"to": "small", "whenBusy": {"gpuUtilAbove": 90}}}),
            "downgrade.big.whenBusy.gpuUtilAbove: expected a finite number from 0 to 1, got 90",
        ),
        (
            with_(
                downgrade={"big": {"to": "small", "whenBusy": {"kvCacheAbove": 0.9, "for": "ten minutes"}}}
            ),
            "downgrade.big.whenBusy.for: expected seconds (600) or a duration such as 600s, 10m, 1h, "
            "got 'ten minutes'",
        ),
        (
            with_(downgrade={"big": {"to": "small", "whenBusy": {"for": 60}}}),
            "downgrade.big.whenBusy: names no signal",
        ),
        (
            with_(downgrade={"big": {"to": "small", "whenBusy": {"waitingBelow": 3}}}),
            "downgrade.big.whenBusy.waitingBelow: needs waitingAbove",
        ),
    ],
)
def test_bad_config_names_key_and_value(doc: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        schema.parse(doc)
    assert message in str(raised.value)


def test_when_busy_parses_durations_and_default_lower_thresholds() -> None:
    rule = {
        "to": "small",
        "whenBusy": {"gpuUtilAbove": 0.9, "waitingAbove": 10, "for": "10m", "leaveAfter": "90s"},
    }
    busy = schema.parse(with_(downgrade={"big": rule})).downgrades["big"].when_busy
    assert busy == Busy((Threshold(GPU_UTIL, 0.9, pytest.approx(0.72)), Threshold(WAITING, 10, 8)), 600, 90)
    only_for = schema.parse(
        with_(downgrade={"big": {"to": "small", "whenBusy": {"kvCacheAbove": 0.9, "for": 60}}})
    )
    assert only_for.downgrades["big"].when_busy == Busy(
        (Threshold(KV_CACHE, 0.9, pytest.approx(0.72)),), 60, 30
    )


def test_verdict_by_ratio_keep_model_and_action() -> None:
    policy = schema.parse(with_(tenants={"vip": {"keepModel": True}}))
    anyone, vip = policy.tenant("t"), policy.tenant("vip")
    assert spend.verdict(policy, anyone, "big", 0.79, 0) == spend.Verdict()
    assert spend.verdict(policy, anyone, "big", 0.8, 0) == spend.Verdict(downgrade=True)
    assert (
        spend.verdict(policy, anyone, "small", 0.99, 0) == spend.Verdict()
    )  # no rule: untouched below 100 %
    full = spend.verdict(policy, anyone, "small", 1.0, 1800.0).rejection
    assert full is not None and full.status == 429 and full.code == "spend_limit_reached"
    assert full.headers["Retry-After"] == "1800"  # until the hour ends
    assert spend.verdict(policy, vip, "big", 5.0, 0) == spend.Verdict()
    refusing = schema.parse(with_(spendGuard={"perHour": 10, "action": "refuse"}))
    refused = spend.verdict(refusing, refusing.tenant("t"), "big", 0.85, 0).rejection
    assert refused is not None and "80% of its hourly spend budget" in refused.message
    assert spend.verdict(refusing, refusing.tenant("t"), "small", 0.85, 0) == spend.Verdict()
    assert spend.actions(policy.spend_guard, 0.5) == set()
    assert spend.actions(policy.spend_guard, 0.9) == {spend.SPEND_DOWNGRADE}
    assert spend.actions(refusing.spend_guard, 0.9) == {spend.SPEND_REFUSE}
    assert spend.actions(policy.spend_guard, 1.0) == {spend.SPEND_FULL}


def test_hysteresis_enters_after_for_and_leaves_after_leave_after_below_the_lower_threshold() -> None:
    busy = Busy((Threshold(GPU_UTIL, 0.9, 0.6),), enter_s=600, leave_s=120)
    state = Hysteresis()

    def at(t: float, util: float | None) -> bool:
        return state.step(busy, {} if util is None else {GPU_UTIL: util}, t)

    assert not at(0, 0.95)
    assert not at(300, 0.95)
    assert not at(400, 0.5)  # a reading below restarts the count
    assert not at(500, 0.95)
    assert not at(1099, 0.95)
    assert at(1100, 0.95)  # 600 s above
    assert at(1200, 0.7)  # between the thresholds: stays
    assert at(5000, 0.7)
    assert at(5000, 0.5)
    assert at(5119, 0.5)
    assert at(5119, 0.65)  # back above the lower threshold: the count restarts
    assert at(5200, 0.5)
    assert not at(5320, 0.5)  # 120 s below
    assert not at(5400, None)  # nothing readable: calm


def test_gpu_util_of_this_pod_else_every_gpu() -> None:
    page = (
        "# TYPE DCGM_FI_DEV_GPU_UTIL gauge\n"
        'DCGM_FI_DEV_GPU_UTIL{gpu="0",pod="vllm-a",namespace="llm"} 96\n'
        'DCGM_FI_DEV_GPU_UTIL{gpu="1",pod="vllm-a",namespace="llm"} 90\n'
        'DCGM_FI_DEV_GPU_UTIL{gpu="2",pod="other",namespace="llm"} 10\n'
        "DCGM_FI_DEV_FB_USED 100\n"
    )
    assert gpu_util(page, "vllm-a") == pytest.approx(0.93)
    assert gpu_util(page, "not-listed") == pytest.approx(196 / 3 / 100)
    assert gpu_util("DCGM_FI_DEV_FB_USED 1\n", "vllm-a") is None
