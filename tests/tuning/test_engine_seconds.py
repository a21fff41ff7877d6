"""What the simulator's once-a-second work sees: arrivals per second taken from the trace,
the token policy asked twice at one instant, KEDA's activation at zero replicas."""

from __future__ import annotations

import numpy as np

from scaler.metadata import parse
from tuning.engine import SimConfig, simulate
from tuning.hpa import HpaSettings
from tuning.policies import FixedPolicy, Policy, Second, TokenPolicy
from tuning.replica import DONE, ReplicaProfile
from tuning.trace import Trace

FAST = ReplicaProfile(cold_start_s=20.0)


class Seconds(Policy):
    """A fixed deployment that keeps every second it observed."""

    name = "fixed"

    def __init__(self, replicas: int) -> None:
        super().__init__(1.0)
        self.inner = FixedPolicy(replicas)
        self.seen: list[Second] = []

    def observe(self, second: Second) -> None:
        self.seen.append(second)

    def value(self, now_s: float, in_flight: int) -> float:
        return self.inner.value(now_s, in_flight)


def test_an_arrival_counts_in_the_second_that_ends_with_or_after_it():
    # the tick at s takes arrivals in (s - 1, s]; the first tick also those at 0
    arrival = np.array([0.0, 1.0, 1.5, 3.0, 3.0001])
    trace = Trace(arrival, np.array([10, 20, 30, 40, 50]), np.array([1, 2, 3, 4, 5]), "seconds")
    policy = Seconds(1)
    hpa = HpaSettings(min_replicas=1, max_replicas=1)
    result = simulate(trace, policy, SimConfig(FAST, hpa, initial_replicas=1, generation_weight=2.0))
    by_second = {s.t: s.arrivals for s in policy.seen}
    assert [by_second[s] for s in (1, 2, 3, 4, 5)] == [2, 1, 1, 1, 0]
    tl = result.timeline
    assert tl["arrived_tokens"][:5].tolist() == [33.0, 33.0, 44.0, 55.0, 0.0]
    assert tl["arrived_weighted"][:5].tolist() == [10 + 2 + 20 + 4, 30 + 6, 40 + 8, 50 + 10, 0.0]
    assert (result.requests.status == DONE).all()


def test_the_token_policy_answers_anew_once_it_observed_more():
    settings = parse({"tokensPerSecondPerReplica": "1000", "panicThreshold": "1000"}, "ns", "llm")
    policy = TokenPolicy(settings)
    trace = Trace(np.array([0.5, 1.5]), np.array([3000, 3000]), np.array([10, 10]), "two")
    simulate(trace, policy, SimConfig(FAST, HpaSettings(min_replicas=1, max_replicas=1)))
    first = policy.value(30.0, 0)
    assert policy.active(30.0, 0) == (first > settings.activation_tokens_per_second)
    assert policy._evaluate(30.0) is policy._evaluate(30.0)  # one instant, nothing new: one answer
    before = policy.observed
    policy.observe(Second(31, 0, 0.0, 0.0, []))
    assert policy.observed == before + 1
    assert policy._evaluate(30.0) is not policy._evaluate(31.0)


def test_a_workload_at_zero_wakes_and_goes_back_to_zero():
    """With minReplicas 0 KEDA's activation is asked at every poll: the first requests wake
    the workload, and after the cooldown without demand it returns to zero."""
    arrival = np.sort(np.random.default_rng(4).uniform(10, 40, 60))
    trace = Trace(arrival, np.full(60, 500), np.full(60, 20), "burst")
    settings = parse({"tokensPerSecondPerReplica": "2000"}, "ns", "llm")
    hpa = HpaSettings(min_replicas=0, max_replicas=3, polling_s=5.0, cooldown_s=60.0).with_scale_down_window(
        30
    )
    result = simulate(trace, TokenPolicy(settings), SimConfig(FAST, hpa, initial_replicas=0, margin_s=300.0))
    ready = result.timeline["ready"]
    assert ready[0] == 0 and ready.max() >= 1 and ready[-1] == 0
    assert (result.requests.status == DONE).all()
