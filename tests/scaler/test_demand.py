"""The rule that picks a window's demand (scaler.demand), scalar and per-array alike."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from scaler.demand import arrivals_lead, demand_of, demands_of


def test_no_margin_takes_the_higher_rate() -> None:
    assert demand_of(1000.0, 1080.0) == 1080.0
    assert demand_of(1000.0, 900.0) == 1000.0  # a queue draining


def test_a_margin_keeps_the_served_rate_until_arrivals_outrun_it() -> None:
    assert demand_of(1000.0, 1080.0, 0.1) == 1000.0
    assert not arrivals_lead(1000.0, 1099.0, 0.1)
    assert demand_of(1000.0, 1100.5, 0.1) == 1100.5


def test_off_is_the_served_rate_unless_nothing_is_served() -> None:
    assert demand_of(1000.0, 30_000.0, math.inf) == 1000.0
    assert demand_of(0.0, 5.0, math.inf) == 5.0  # at zero replicas, or requests held at a gateway
    assert demand_of(-20.0, 3.0, math.inf) == 3.0  # corrections may make a window's served count negative


rates = st.floats(min_value=-1e6, max_value=1e7, allow_nan=False)
margins = st.sampled_from([0.0, 0.1, 0.5, 10.0, math.inf])


@given(st.lists(st.tuples(rates, rates), min_size=1, max_size=30), margins)
def test_arrays_agree_with_the_scalar_rule(pairs: list[tuple[float, float]], margin: float) -> None:
    served = np.array([p[0] for p in pairs])
    arrived = np.array([p[1] for p in pairs])
    expected = [demand_of(s, a, margin) for s, a in pairs]
    assert demands_of(served, arrived, margin).tolist() == expected


@given(rates, rates)
def test_no_margin_is_the_higher_rate_never_negative(served: float, arrived: float) -> None:
    assert demand_of(served, arrived) == max(served, arrived, 0.0)


@given(rates, rates, margins)
def test_the_demand_is_one_of_the_rates_never_negative(served: float, arrived: float, margin: float) -> None:
    d = demand_of(served, arrived, margin)
    assert d >= 0 and d in (max(served, 0.0), max(arrived, 0.0))
    assert d <= max(served, arrived, 0.0)
