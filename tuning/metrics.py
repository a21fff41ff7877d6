"""Figures of one run: cost, latency, SLO attainment, queues and replicas."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from tuning.engine import RunResult
from tuning.replica import DONE, DROPPED, REJECTED


@dataclass(frozen=True)
class Slo:
    ttft_s: float = 2.0
    e2e_s: float = 20.0


def _pct(values: np.ndarray[Any, np.dtype[np.float64]], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if len(values) else None


def summarize(result: RunResult, slo: Slo) -> dict[str, Any]:
    """A JSON-ready summary. Attainment counts every request that arrived: rejected and
    dropped ones miss the SLO."""
    r = result.requests
    n = len(r.arrival)
    done = r.status == DONE
    rejected = r.status == REJECTED
    dropped = r.status == DROPPED
    ttft = (r.first_token - r.arrival)[done]
    e2e = (r.finish - r.arrival)[done]
    ttft_ok = np.zeros(n, dtype=bool)
    e2e_ok = np.zeros(n, dtype=bool)
    ttft_ok[done] = ttft <= slo.ttft_s
    e2e_ok[done] = e2e <= slo.e2e_s
    lost = rejected | dropped
    profile = result.config.replica
    replica_hours = result.pod_seconds / 3600
    tl = result.timeline
    within = tl["t"] <= result.horizon_s
    pods = tl["pods"][within]
    queue = tl["queue"][within]
    return {
        "policy": result.policy,
        "settings": result.description,
        "requests": n,
        "completed": int(done.sum()),
        "rejected": int(rejected.sum()),
        "dropped": int(dropped.sum()),
        "tokens_lost": int((r.prompt[lost] + r.generated[lost]).sum()),
        "replica_hours": round(replica_hours, 3),
        "gpu_hours": round(replica_hours * profile.gpus_per_replica, 3),
        "cost": round(replica_hours * profile.price_per_hour, 2),
        "slo_ttft": round(float(ttft_ok.mean()), 4) if n else None,
        "slo_e2e": round(float(e2e_ok.mean()), 4) if n else None,
        "slo_both": round(float((ttft_ok & e2e_ok).mean()), 4) if n else None,
        "ttft_p50": _pct(ttft, 50),
        "ttft_p95": _pct(ttft, 95),
        "ttft_p99": _pct(ttft, 99),
        "e2e_p50": _pct(e2e, 50),
        "e2e_p95": _pct(e2e, 95),
        "e2e_p99": _pct(e2e, 99),
        "queue_mean": round(float(queue.mean()), 2) if len(queue) else 0.0,
        "queue_max": int(queue.max()) if len(queue) else 0,
        "replicas_mean": round(float(pods.mean()), 2) if len(pods) else 0.0,
        "replicas_max": int(pods.max()) if len(pods) else 0,
        "scale_ups": result.scale_ups,
        "scale_downs": result.scale_downs,
        "horizon_s": result.horizon_s,
    }
