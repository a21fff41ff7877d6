"""The parts of one ScaledObject's debug view (/debug/scalers), each from what it shows (pure).

registry.py puts them together: what the sidecars of the workload report, what was read of
its stream, its tenants' rates, the forecast and the evaluation behind the last answer.
"""

from __future__ import annotations

import math
import time
from typing import Any

from scaler.forecast import Forecast
from scaler.metadata import ScalerSettings
from scaler.pressure import Pressure
from scaler.series import SidecarState, WorkloadSeries
from scaler.window import Evaluation, Rates


def iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


def sidecars(
    series: WorkloadSeries, live: dict[str, SidecarState], server: Pressure, model: str | None
) -> dict[str, Any]:
    """The live sidecars, their in-flight gauges (of ``model`` alone when given) and the model
    servers' own."""
    gauges = [0, 0, 0, 0]
    for st in live.values():
        for name, g in st.gauges.items():
            if model is None or name == model:
                gauges = [a + b for a, b in zip(gauges, g, strict=True)]
    return {
        "live": len(live),
        "known": len(series.sidecars),
        "ids": sorted(live),
        "inflightRequests": gauges[0],
        "inflightIncludingHeldAtGateways": server.in_flight,
        "waitingForFirstToken": gauges[1],
        "backlogPromptTokens": gauges[2],
        "backlogGenerationTokens": gauges[3],
        "modelServers": {
            "reportingKvCache": server.replicas,
            "kvCacheInUse": round(server.kv_sum, 4),
            "running": server.running,
            "waiting": server.waiting,
        },
    }


def stream(series: WorkloadSeries, bad: int, implausible: int) -> dict[str, Any]:
    """The entries read of the workload's stream, and those set aside."""
    return {
        "entriesRead": series.entries,
        "badEntries": bad,
        "tooOldEntries": series.too_old,
        "duplicateEntries": series.duplicates,
        "implausibleEntries": implausible,
        "clockClampedEntries": series.clamped,
    }


def tenants(series: WorkloadSeries, now_ms: int, model: str | None) -> dict[str, dict[str, float]]:
    """Each tenant's token rates over the tenant window (of ``model`` alone when given)."""
    covered, totals = series.tenant_window(now_ms)
    out: dict[str, dict[str, float]] = {}
    for (tenant, name), (prompt, gen) in totals.items():
        if model is None or name == model:
            row = out.setdefault(tenant, {"promptTokensPerSecond": 0.0, "generationTokensPerSecond": 0.0})
            row["promptTokensPerSecond"] += prompt / max(covered, 1)
            row["generationTokensPerSecond"] += gen / max(covered, 1)
    return out


def forecast(fc: Forecast | None, s: ScalerSettings) -> dict[str, Any] | None:
    if fc is None:
        return None
    return {
        "valueTokensPerSecond": round(fc.value, 3),
        "leadSeconds": s.lead_s,
        "season": fc.season,
        "level": round(fc.level, 3),
        "recentError": None if fc.error is None else round(fc.error, 4),
        "maxError": s.max_forecast_error,
        "trusted": fc.trusted,
        "reason": fc.reason,
    }


def evaluation(e: Evaluation, s: ScalerSettings) -> dict[str, Any]:
    return {
        "second": e.second,
        "windowCoverageSeconds": e.coverage_s,
        "stable": rates(e.stable),
        "panic": rates(e.panic),
        "panicActive": e.panic_active,
        "panicSinceSecond": e.panic_since,
        "burstEnvelope": round(e.envelope, 3) if s.burst_window_s else None,
        "value": e.value,
        "hpaDesiredReplicas": e.replicas,
        "active": e.active,
        "rule": e.rule,
        "reason": e.reason,
    }


def rates(r: Rates) -> dict[str, float]:
    def rounded(x: float) -> float:
        return round(x, 3) if math.isfinite(x) else 0.0

    return {
        "windowSeconds": rounded(r.seconds),
        "servedPromptTokensPerSecond": rounded(r.served_prompt),
        "servedGenerationTokensPerSecond": rounded(r.served_generation),
        "arrivedPromptTokensPerSecond": rounded(r.arrived_prompt),
        "arrivedGenerationTokensPerSecond": rounded(r.arrived_generation),
        "requestsPerSecond": rounded(r.requests),
        "arrivedRequestsPerSecond": rounded(r.arrived_requests),
        "weightedTokensPerRequest": rounded(r.size),
        "servedWeighted": rounded(r.served),
        "arrivedWeighted": rounded(r.arrived),
        "demand": rounded(r.demand),
    }
