"""Floors on the replicas asked for, from what the replicas hold right now.

Tokens per second say how much work arrives; what the replicas hold says how far behind
they are. Two floors, each off unless its key is set:

* ``kvCacheTarget`` t: at least ``ceil(sum of the live replicas' KV-cache use / t)``
  replicas, the number at which their current contexts would fill each cache to t on
  average. Long contexts can fill a replica's cache (and make it queue or preempt) while
  its token rate looks moderate. The use comes from the sidecars' records (field ``s``,
  read from each model server's own metrics); replicas whose server does not report it
  are left out of the sum, and without any report the floor does not apply.
* ``inFlightPerReplica`` c: at least ``ceil(requests in flight / c)`` replicas, counting
  the requests at every live sidecar (queued in the model server or being served) and
  those held at gateways. A rate over a window says what arrives, not what piles up: when
  requests take longer than the weights foresee (longer contexts, a slower batch), the
  requests in flight grow while the token rate does not. It is the signal KEDA's HTTP
  add-on scales on alone; here it bounds the token answer from below.

The gauges are each writer's last record's (``in`` per model); a writer silent for longer
than the liveness bound is left out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from scaler.metadata import ScalerSettings
from scaler.series import SidecarState
from scaler.window import Evaluation


@dataclass(frozen=True)
class Pressure:
    replicas: int  # live replicas reporting KV-cache use
    kv_sum: float  # their use added up, in caches
    running: int  # requests running in the model servers (those that report it)
    waiting: int  # requests waiting in the model servers' own queues
    in_flight: int = 0  # requests in flight at the sidecars and held at gateways

    def floor(self, target: float) -> int:
        return math.ceil(self.kv_sum / target - 1e-9) if self.replicas else 0


def pressure(live: dict[str, SidecarState], model: str | None = None) -> Pressure:
    """What the live writers hold; ``live`` may include gateways (their held requests count
    as in flight; they run no model server). ``model``: count only that model's requests."""
    gauges = [st.server for st in live.values() if st.server is not None and not st.gateway]
    kv = [g.kv_usage for g in gauges if g.kv_usage is not None]
    in_flight = sum(g[0] for st in live.values() for m, g in st.gauges.items() if model is None or m == model)
    return Pressure(
        len(kv),
        sum(kv),
        sum(g.running or 0 for g in gauges),
        sum(g.waiting or 0 for g in gauges),
        in_flight,
    )


def _raise_to(evaluation: Evaluation, floor: int, rule: str, reason: str) -> Evaluation:
    return replace(
        evaluation,
        value=floor * evaluation.target,
        replicas=floor,
        active=True,
        rule=rule,
        reason=f"{reason} (the token demand asks for {evaluation.replicas}: {evaluation.reason})",
    )


def apply_floor(evaluation: Evaluation, p: Pressure, settings: ScalerSettings) -> Evaluation:
    """The evaluation, raised so that the HPA asks for at least each floor that is set."""
    kv_target = settings.kv_cache_target
    if kv_target is not None:
        if not p.replicas:
            note = "; kvCacheTarget: no model server reports its KV-cache use"
            evaluation = replace(evaluation, reason=evaluation.reason + note)
        else:
            floor = p.floor(kv_target)
            if floor > evaluation.replicas:
                evaluation = _raise_to(
                    evaluation,
                    floor,
                    "kv-cache",
                    f"KV-cache floor: {p.replicas} replicas hold {p.kv_sum:.2f} caches of context; "
                    f"at {100 * kv_target:g} % each that is {floor} replicas",
                )
    per_replica = settings.in_flight_per_replica
    if per_replica is not None and p.in_flight > 0:
        floor = math.ceil(p.in_flight / per_replica - 1e-9)
        if floor > evaluation.replicas:
            evaluation = _raise_to(
                evaluation,
                floor,
                "in-flight",
                f"in-flight floor: {p.in_flight} requests in flight at {per_replica:g} per replica "
                f"need {floor} replicas",
            )
    return evaluation
