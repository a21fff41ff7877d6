"""The scaler's second line of defence: no sidecar, and no answer, past what is plausible.

The sidecars bound each response's usage (sidecar/usage_bounds.py), but the scaler
trusts no writer of the streams either (another version, a bug, anything with access
to Redis). Two bounds, in weighted tokens (the units of ``tokensPerSecondPerReplica``):

- **Per sidecar and second** (``IngestCeiling``): what one sidecar reports for one second
  of the stream may ask for at most ``multiple`` (``--sidecar-ceiling-multiple``, 20) replicas'
  worth, ``multiple x tokensPerSecondPerReplica`` weighted tokens/s, or
  ``--max-sidecar-tokens-per-second`` when set. An entry past it is scaled down
  (its token counters, per model and per tenant, by one factor) to what is left of the
  ceiling in that second, counted (``stream.implausibleEntries``,
  ``tokenscaler_scaler_implausible_entries_total``) and named in the reason of the
  answers whose window holds it. An entry's weighted tokens are the larger of served and
  arrived (``pw x p + gw x g``, positive counters only), per model the ScaledObject counts;
  an entry whose interval (``dt``, written by the writer) is longer than a second may carry
  that many seconds' worth, up to ``MAX_CREDITED_S``.
  Several ScaledObjects reading one workload: an entry is clamped only as far as the most
  permissive of them allows. A gateway's entries are left as they are: what it holds at
  zero replicas is a whole burst's arrivals, and each is taken back later by a negative
  entry that must meet the same count (the answer's cap still bounds them).
- **Per answer** (``bound_answer``): with ``maxReplicas`` set, the value KEDA gets is never
  above ``maxReplicas x target``, which is all the HPA can use.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from dataclasses import dataclass

from scaler.metadata import ScalerSettings
from scaler.series import WorkloadSeries
from scaler.window import Evaluation, replicas_for
from token_scaler.record import GATEWAY, Record, TenantCounts, entry_time_ms

DEFAULT_MULTIPLE = 20.0
MAX_CREDITED_S = 60.0  # the most seconds' worth one entry may carry, whatever its dt says
_KEEP_CLAMPS_S = 1300  # longer than any window the answers look back over


@dataclass(frozen=True)
class Limit:
    model: str | None
    prompt_weight: float
    generation_weight: float
    per_second: float  # weighted tokens/s one sidecar may report

    def load(self, record: Record, seconds: float) -> float:
        """The entry's weighted tokens as a share of what this limit allows over ``seconds``."""
        sp = sg = ap = ag = 0
        only = self.model
        for model, c in record.models.items():
            if only is None or model == only:
                sp += c.served_prompt if c.served_prompt > 0 else 0
                sg += c.served_generation if c.served_generation > 0 else 0
                ap += c.arrived_prompt if c.arrived_prompt > 0 else 0
                ag += c.arrived_generation if c.arrived_generation > 0 else 0
        pw, gw = self.prompt_weight, self.generation_weight
        return max(pw * sp + gw * sg, pw * ap + gw * ag) / (self.per_second * seconds)


@dataclass
class _Second:
    sec: int = -1
    used: float = 0.0  # share of the ceiling used by the sidecar's entries in ``sec``


class IngestCeiling:
    def __init__(self, multiple: float = DEFAULT_MULTIPLE, absolute: float | None = None) -> None:
        self.multiple = multiple
        self.absolute = absolute
        self._limits: dict[str, dict[tuple[str, str], Limit]] = {}
        self._seconds: dict[str, dict[str, _Second]] = {}
        self.implausible: dict[str, int] = {}
        self._clamped: dict[str, deque[int]] = {}  # seconds of clamped entries, per workload

    def per_second(self, settings: ScalerSettings) -> float:
        if self.absolute is not None:
            return self.absolute
        return self.multiple * settings.tokens_per_second_per_replica

    def watch(self, namespace: str, name: str, settings: ScalerSettings) -> None:
        """The ScaledObject ``namespace/name`` reads ``settings.workload`` with these settings."""
        for limits in self._limits.values():
            limits.pop((namespace, name), None)
        self._limits.setdefault(settings.workload, {})[(namespace, name)] = Limit(
            settings.model, settings.prompt_weight, settings.generation_weight, self.per_second(settings)
        )

    def forget(self, namespace: str, name: str) -> None:
        for limits in self._limits.values():
            limits.pop((namespace, name), None)

    def drop(self, workload: str) -> None:
        for table in (self._limits, self._seconds, self.implausible, self._clamped):
            table.pop(workload, None)

    def clamp(self, workload: str, series: WorkloadSeries, record: Record, entry_id: bytes | str) -> Record:
        """``record``, or a copy scaled down to what is left of its sidecar's ceiling this second."""
        limits = self._limits.get(workload)
        if record.role == GATEWAY:
            return record
        state = series.sidecars.get(record.sidecar)
        if not limits or (state is not None and record.seq <= state.last_seq):
            return record  # no ScaledObject to judge by, or a duplicate the series will skip
        seconds = min(record.interval_ms / 1000, MAX_CREDITED_S) if record.interval_ms > 1000 else 1.0
        if len(limits) == 1:
            load = next(iter(limits.values())).load(record, seconds)
        else:
            load = min(limit.load(record, seconds) for limit in limits.values())
        if load <= 0:
            return record
        sec = entry_time_ms(record, entry_id) // 1000
        sidecars = self._seconds.get(workload)
        if sidecars is None:
            sidecars = self._seconds[workload] = {}
        second = sidecars.get(record.sidecar)
        if second is None:
            second = sidecars[record.sidecar] = _Second()
        if second.sec != sec:
            second.sec, second.used = sec, 0.0
        if second.used + load <= 1.0:
            second.used += load
            return record
        factor = max(0.0, 1.0 - second.used) / load
        second.used = 1.0
        self.implausible[workload] = self.implausible.get(workload, 0) + 1
        clamped = self._clamped.setdefault(workload, deque())
        clamped.append(sec)
        while clamped and clamped[0] < sec - _KEEP_CLAMPS_S:
            clamped.popleft()
        return scaled(record, factor)

    def clamped_between(self, workload: str, start: int, stop: int) -> int:
        """Clamped entries that landed in seconds ``[start, stop)``."""
        return sum(1 for sec in self._clamped.get(workload, ()) if start <= sec < stop)

    def forget_sidecars(self, workload: str, live: set[str]) -> None:
        seconds = self._seconds.get(workload)
        if seconds is not None:
            for sidecar in [s for s in seconds if s not in live]:
                del seconds[sidecar]


def scaled(record: Record, factor: float) -> Record:
    """The record with its token counters times ``factor`` (rounded toward zero)."""

    def mul(value: int) -> int:
        return int(value * factor)

    models = {
        model: dataclasses.replace(
            c,
            served_prompt=mul(c.served_prompt),
            served_generation=mul(c.served_generation),
            arrived_prompt=mul(c.arrived_prompt),
            arrived_generation=mul(c.arrived_generation),
        )
        for model, c in record.models.items()
    }
    tenants = {
        tenant: {m: TenantCounts(mul(t.prompt), mul(t.generation), t.requests) for m, t in per_model.items()}
        for tenant, per_model in record.tenants.items()
    }
    return dataclasses.replace(record, models=models, tenants=tenants)


def bound_answer(
    evaluation: Evaluation, settings: ScalerSettings, ceiling: IngestCeiling | None = None
) -> Evaluation:
    """The evaluation with its value capped at ``maxReplicas x target`` (when set), and its
    reason naming the clamped entries its window holds."""
    reason = evaluation.reason
    value = evaluation.value
    if ceiling is not None:
        second = evaluation.second
        clamped = ceiling.clamped_between(settings.workload, second - 2 * settings.window_s, second)
        if clamped:
            reason += (
                f"; {clamped} entries above the per-sidecar ceiling of "
                f"{ceiling.per_second(settings):.0f} weighted tokens/s were clamped to it "
                "(stream.implausibleEntries)"
            )
    if settings.max_replicas > 0:
        most = settings.max_replicas * evaluation.target
        if value > most:
            reason += (
                f"; capped at maxReplicas {settings.max_replicas} x target {evaluation.target:.1f} "
                f"= {most:.1f} (the demand was {value:.1f})"
            )
            value = most
    if reason == evaluation.reason and value == evaluation.value:
        return evaluation
    return dataclasses.replace(
        evaluation,
        value=value,
        replicas=replicas_for(value, evaluation.target),
        active=value > settings.activation_tokens_per_second,
        reason=reason,
    )
