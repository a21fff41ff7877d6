"""The Kubernetes HPA (autoscaling/v2 with behavior) as KEDA configures it, and KEDA's own
0 <-> 1 activation: the control loop every policy of the simulator goes through.

Followed from kubernetes ``pkg/controller/podautoscaler`` (horizontal.go, replica_calculator.go):

* External metric with ``AverageValue`` (KEDA's default): ``ratio = value / (target x current)``;
  when ``|1 - ratio| <= tolerance`` the count stays, else ``ceil(value / target)``.
* Initial recommendation: the first reconcile records the current count as a
  recommendation (``recordInitialRecommendation``), so a new HPA does not scale down
  before a scale-down window has passed.
* Stabilization (``stabilizeRecommendationWithBehaviors``): every sync records its raw
  recommendation. The upper bound for scaling up is the lowest recommendation in the
  scale-up window (default 0 s: the raw one), the lower bound for scaling down the highest
  in the scale-down window (default 300 s); the count rises to the first when it is below
  it and falls to the second when it is above it, and otherwise stays. So a count never
  rises while the raw recommendation is below it, whatever the older recommendations say.
* Rate policies, per period: ``Pods`` adds/removes at most N pods, ``Percent`` N % of the
  count at the start of the period, which is the current count with every scale-up and
  scale-down within the period undone (both directions, as Kubernetes since 1.27);
  ``selectPolicy: Max`` takes the policy allowing the larger change. Defaults: up
  max(4 pods, 100 %) per 15 s; down 100 % per 15 s.
* Then min/max replicas. ``current`` is the pods the Deployment has (starting or ready,
  not terminating).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from token_scaler.native import by_value

PolicyKind = Literal["Pods", "Percent"]
Select = Literal["Max", "Min", "Disabled"]


@dataclass(frozen=True)
class RatePolicy:
    kind: PolicyKind
    value: int
    period_s: float

    def __reduce__(self) -> tuple[type[RatePolicy], tuple[Any, ...]]:
        return by_value(self)


@dataclass(frozen=True)
class Rules:
    stabilization_s: float
    policies: tuple[RatePolicy, ...]
    select: Select = "Max"

    def __reduce__(self) -> tuple[type[Rules], tuple[Any, ...]]:
        return by_value(self)


DEFAULT_SCALE_UP = Rules(0.0, (RatePolicy("Pods", 4, 15.0), RatePolicy("Percent", 100, 15.0)))
DEFAULT_SCALE_DOWN = Rules(300.0, (RatePolicy("Percent", 100, 15.0),))


@dataclass(frozen=True)
class HpaSettings:
    min_replicas: int = 1  # KEDA minReplicaCount; 0 lets KEDA scale to zero
    max_replicas: int = 100
    tolerance: float = 0.1
    sync_s: float = 15.0  # --horizontal-pod-autoscaler-sync-period
    polling_s: float = 30.0  # KEDA pollingInterval (activation, and the value with useCachedMetrics)
    cooldown_s: float = 300.0  # KEDA cooldownPeriod (only with min_replicas 0)
    use_cached_metrics: bool = False
    scale_up: Rules = DEFAULT_SCALE_UP
    scale_down: Rules = DEFAULT_SCALE_DOWN

    def __reduce__(self) -> tuple[type[HpaSettings], tuple[Any, ...]]:
        return by_value(self)

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ValueError("need 0 <= min replicas <= max replicas and max replicas >= 1")
        if self.tolerance < 0 or self.sync_s <= 0 or self.polling_s <= 0:
            raise ValueError("tolerance >= 0, sync and polling intervals > 0")

    def with_scale_down_window(self, seconds: float) -> HpaSettings:
        down = Rules(seconds, self.scale_down.policies, self.scale_down.select)
        return HpaSettings(
            self.min_replicas,
            self.max_replicas,
            self.tolerance,
            self.sync_s,
            self.polling_s,
            self.cooldown_s,
            self.use_cached_metrics,
            self.scale_up,
            down,
        )


def metric_replicas(value: float, target: float, current: int, tolerance: float) -> int:
    """replica_calculator.GetExternalPerPodMetricReplicas: AverageValue with tolerance."""
    if current > 0:
        ratio = value / (target * current)
        if abs(1.0 - ratio) <= tolerance:
            return current
    return math.ceil(value / target)


Events = list[tuple[float, int]]


def _changed_within(events: Events, now: float, period_s: float) -> int:
    return sum(change for t, change in events if t > now - period_s)


def _period_start(current: int, ups: Events, downs: Events, now: float, period_s: float) -> int:
    """The count at the start of the period: every change within it undone."""
    return current - _changed_within(ups, now, period_s) + _changed_within(downs, now, period_s)


def scale_up_limit(current: int, ups: Events, rules: Rules, now: float, downs: Events | None = None) -> int:
    if rules.select == "Disabled":
        return current
    proposals = []
    for policy in rules.policies:
        start = _period_start(current, ups, downs or [], now, policy.period_s)
        if policy.kind == "Pods":
            proposals.append(start + policy.value)
        else:
            proposals.append(math.ceil(start * (1 + policy.value / 100)))
    return (min if rules.select == "Min" else max)(proposals)


def scale_down_limit(current: int, downs: Events, rules: Rules, now: float, ups: Events | None = None) -> int:
    if rules.select == "Disabled":
        return current
    proposals = []
    for policy in rules.policies:
        start = _period_start(current, ups or [], downs, now, policy.period_s)
        if policy.kind == "Pods":
            proposals.append(start - policy.value)
        else:
            proposals.append(int(start * (1 - policy.value / 100)))
    return (max if rules.select == "Min" else min)(proposals)


@dataclass
class Hpa:
    """One HorizontalPodAutoscaler's memory: recommendations and scale events."""

    settings: HpaSettings
    recommendations: Events = field(default_factory=list)
    up_events: Events = field(default_factory=list)
    down_events: Events = field(default_factory=list)
    initialized: bool = False

    def sync(self, now: float, current: int, value: float, target: float) -> int:
        """One reconcile: the replica count the HPA sets (``current`` when it leaves it)."""
        s = self.settings
        hpa_min = max(1, s.min_replicas)
        if current == 0:
            return 0  # scaling is disabled at zero; KEDA activates
        if not self.initialized:
            self.recommendations.append((now, current))
            self.initialized = True
        if current > s.max_replicas:
            desired = s.max_replicas
        elif current < hpa_min:
            desired = hpa_min
        else:
            raw = metric_replicas(value, target, current, s.tolerance)
            desired = self._normalize(now, current, raw, hpa_min)
        if desired > current:
            self.up_events.append((now, desired - current))
        elif desired < current:
            self.down_events.append((now, current - desired))
        self._forget(now)
        return desired

    def _normalize(self, now: float, current: int, raw: int, hpa_min: int) -> int:
        s = self.settings
        up_bound = down_bound = raw
        for t, rec in self.recommendations:
            if t > now - s.scale_up.stabilization_s:
                up_bound = min(up_bound, rec)
            if t > now - s.scale_down.stabilization_s:
                down_bound = max(down_bound, rec)
        self.recommendations.append((now, raw))
        stabilized = min(max(current, up_bound), down_bound)
        if stabilized > current:
            up = scale_up_limit(current, self.up_events, s.scale_up, now, self.down_events)
            return min(stabilized, s.max_replicas, max(up, current))
        if stabilized < current:
            down = scale_down_limit(current, self.down_events, s.scale_down, now, self.up_events)
            return max(stabilized, hpa_min, min(down, current))
        return stabilized

    def _forget(self, now: float) -> None:
        s = self.settings
        keep = max(s.scale_up.stabilization_s, s.scale_down.stabilization_s)
        self.recommendations = [(t, r) for t, r in self.recommendations if t > now - keep - 1]
        # either direction's limit undoes the other's changes within its own periods
        period = max((p.period_s for p in s.scale_up.policies + s.scale_down.policies), default=0.0)
        self.up_events = [(t, c) for t, c in self.up_events if t > now - period - 1]
        self.down_events = [(t, c) for t, c in self.down_events if t > now - period - 1]
