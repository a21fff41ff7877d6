"""The HPA model against hand-computed cases (kubernetes pkg/controller/podautoscaler)."""

from __future__ import annotations

import pytest

from tuning.hpa import (
    DEFAULT_SCALE_UP,
    Hpa,
    HpaSettings,
    RatePolicy,
    Rules,
    metric_replicas,
    scale_down_limit,
    scale_up_limit,
)


@pytest.mark.parametrize(
    ("value", "target", "current", "expected"),
    [
        (100.0, 10.0, 10, 10),  # exactly on target
        (109.0, 10.0, 10, 10),  # ratio 1.09: inside the 0.1 tolerance
        (111.0, 10.0, 10, 12),  # ratio 1.11: ceil(11.1)
        (91.0, 10.0, 10, 10),  # ratio 0.91: inside
        (89.0, 10.0, 10, 9),  # ratio 0.89: ceil(8.9)
        (0.0, 10.0, 3, 0),  # nothing to serve: the HPA's min applies later
        (25.0, 10.0, 0, 3),  # from zero there is no ratio: ceil(2.5)
    ],
)
def test_average_value_formula_with_tolerance(value, target, current, expected):
    assert metric_replicas(value, target, current, 0.1) == expected


def test_default_scale_up_limit_is_max_of_four_pods_and_double():
    assert scale_up_limit(1, [], DEFAULT_SCALE_UP, 100.0) == 5
    assert scale_up_limit(3, [], DEFAULT_SCALE_UP, 100.0) == 7
    assert scale_up_limit(10, [], DEFAULT_SCALE_UP, 100.0) == 20
    # 2 -> 6 at t=90: within the 15 s period the start count is 2 again
    assert scale_up_limit(6, [(90.0, 4)], DEFAULT_SCALE_UP, 100.0) == 6
    # the event is older than the period (strictly after now - 15 counts)
    assert scale_up_limit(6, [(85.0, 4)], DEFAULT_SCALE_UP, 100.0) == 12


def test_scale_down_limits():
    one_per_minute = Rules(0.0, (RatePolicy("Pods", 1, 60.0),))
    assert scale_down_limit(10, [], one_per_minute, 0.0) == 9
    assert scale_down_limit(9, [(30.0, 1)], one_per_minute, 60.0) == 9
    half = Rules(0.0, (RatePolicy("Percent", 50, 15.0),))
    assert scale_down_limit(9, [], half, 0.0) == 4  # int(9 * 0.5)


def test_scale_down_waits_for_the_stabilization_window():
    hpa = Hpa(HpaSettings(min_replicas=1, max_replicas=20).with_scale_down_window(60.0))
    assert hpa.sync(0.0, 10, 100.0, 10.0) == 10
    # demand drops to 2 replicas' worth; the recommendation of t=0 (10) holds while it is
    # inside the window (t > now - 60), so nothing moves before t=60
    assert [hpa.sync(t, 10, 20.0, 10.0) for t in (15.0, 30.0, 45.0)] == [10, 10, 10]
    assert hpa.sync(60.0, 10, 20.0, 10.0) == 2


def test_scale_up_is_rate_limited_and_capped():
    hpa = Hpa(HpaSettings(min_replicas=1, max_replicas=12))
    assert hpa.sync(0.0, 1, 1000.0, 10.0) == 5  # wants 100: 1 + 4 pods
    assert hpa.sync(15.0, 5, 1000.0, 10.0) == 10  # 15 s later: double
    assert hpa.sync(30.0, 10, 1000.0, 10.0) == 12  # maxReplicas


def test_scale_down_stops_at_min_replicas_and_zero_disables():
    hpa = Hpa(HpaSettings(min_replicas=2, max_replicas=10).with_scale_down_window(0.0))
    assert hpa.sync(0.0, 5, 0.0, 10.0) == 2
    assert hpa.sync(15.0, 0, 500.0, 10.0) == 0  # at zero the HPA does nothing; KEDA activates


def test_min_change_policy_and_disabled():
    slow = Rules(0.0, (RatePolicy("Pods", 1, 15.0), RatePolicy("Percent", 100, 15.0)), "Min")
    assert scale_up_limit(4, [], slow, 0.0) == 5
    off = Rules(0.0, (RatePolicy("Pods", 4, 15.0),), "Disabled")
    assert scale_up_limit(4, [], off, 0.0) == 4
