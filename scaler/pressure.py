"""KV-cache pressure as a floor on the replicas asked for (``kvCacheTarget``).

Tokens per second say how much work arrives; the model servers' KV caches say how much
of it they hold at once. Long contexts can fill a replica's cache (and make it queue or
preempt) while its token rate looks moderate. With ``kvCacheTarget`` t, the scaler asks
for at least ``ceil(sum of the live replicas' KV-cache use / t)`` replicas: the number at
which their current contexts would fill each cache to t on average. The use comes from
the sidecars' records (field ``s``, read from each model server's own metrics); replicas
whose server does not report it are left out of the sum, and without any report the floor
does not apply (the reason says so).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from scaler.metadata import ScalerSettings
from scaler.window import Evaluation, SidecarState


@dataclass(frozen=True)
class Pressure:
    replicas: int  # live replicas reporting KV-cache use
    kv_sum: float  # their use added up, in caches
    running: int  # requests running in the model servers (those that report it)
    waiting: int  # requests waiting in the model servers' own queues

    def floor(self, target: float) -> int:
        return math.ceil(self.kv_sum / target - 1e-9) if self.replicas else 0


def pressure(live: dict[str, SidecarState]) -> Pressure:
    gauges = [st.server for st in live.values() if st.server is not None]
    kv = [g.kv_usage for g in gauges if g.kv_usage is not None]
    return Pressure(
        len(kv),
        sum(kv),
        sum(g.running or 0 for g in gauges),
        sum(g.waiting or 0 for g in gauges),
    )


def apply_floor(evaluation: Evaluation, p: Pressure, settings: ScalerSettings) -> Evaluation:
    """The evaluation, raised so that the HPA asks for at least the KV floor."""
    target = settings.kv_cache_target
    if target is None:
        return evaluation
    if not p.replicas:
        note = "; kvCacheTarget: no model server reports its KV-cache use"
        return replace(evaluation, reason=evaluation.reason + note)
    floor = p.floor(target)
    if floor <= evaluation.replicas:
        return evaluation
    value = floor * evaluation.target
    return replace(
        evaluation,
        value=value,
        replicas=floor,
        active=True,
        rule="kv-cache",
        reason=(
            f"KV-cache floor: {p.replicas} replicas hold {p.kv_sum:.2f} caches of context; at "
            f"{100 * target:g} % each that is {floor} replicas (the token demand asks for "
            f"{evaluation.replicas}: {evaluation.reason})"
        ),
    )
