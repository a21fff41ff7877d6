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


def test_a_new_hpa_records_the_current_count_first():
    # recordInitialRecommendation: the first sync sees the current 10 as a recommendation
    # of its own, so the 300 s scale-down window holds 10 until it has passed
    hpa = Hpa(HpaSettings(min_replicas=1, max_replicas=20))
    assert hpa.sync(0.0, 10, 20.0, 10.0) == 10
    assert hpa.sync(285.0, 10, 20.0, 10.0) == 10
    assert hpa.sync(300.0, 10, 20.0, 10.0) == 2


def test_stabilization_never_scales_up_while_the_metric_is_below_the_count():
    hpa = Hpa(
        HpaSettings(min_replicas=1, max_replicas=20, scale_up=Rules(0.0, (RatePolicy("Pods", 1, 15.0),)))
    )
    assert hpa.sync(0.0, 4, 80.0, 10.0) == 5  # wants 8, one pod per 15 s
    # the demand falls to 4 replicas' worth while 5 run: the 8 recommended at t=0 is
    # inside the scale-down window, which only keeps the count from falling; the
    # scale-up bound is the raw 4, so the count stays at 5 (it does not rise toward 8)
    assert hpa.sync(15.0, 5, 40.0, 10.0) == 5
    assert hpa.sync(30.0, 5, 40.0, 10.0) == 5


def test_scale_up_window_takes_the_lowest_recent_recommendation():
    up = Rules(60.0, DEFAULT_SCALE_UP.policies)
    hpa = Hpa(HpaSettings(min_replicas=1, max_replicas=20, scale_up=up))
    assert hpa.sync(0.0, 2, 20.0, 10.0) == 2  # initial 2 and raw 2
    assert hpa.sync(15.0, 2, 60.0, 10.0) == 2  # raw 6, but 2 was recommended within 60 s
    assert hpa.sync(75.0, 2, 60.0, 10.0) == 6  # only the 6 of t=15 and t=75 remain


def test_rate_limits_undo_changes_of_both_directions_within_the_period():
    # 10 -> 4 at t=90: at t=100 the 15 s period started at 10 pods, so a scale-up may
    # reach max(10 + 4, 2 x 10) = 20, not max(4 + 4, 2 x 4) = 8
    assert scale_up_limit(4, [], DEFAULT_SCALE_UP, 100.0, [(90.0, 6)]) == 20
    half = Rules(0.0, (RatePolicy("Percent", 50, 60.0),))
    # 4 -> 8 at t=30: the minute started at 4 pods, so a scale-down may reach int(4 x 0.5)
    assert scale_down_limit(8, [], half, 60.0, [(30.0, 4)]) == 2
    hpa = Hpa(HpaSettings(min_replicas=1, max_replicas=40).with_scale_down_window(0.0))
    assert hpa.sync(0.0, 10, 40.0, 10.0) == 4
    assert hpa.sync(10.0, 4, 200.0, 10.0) == 20
