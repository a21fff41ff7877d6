"""Figures of one run: cost, latency, SLO attainment, queues and replicas."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import numpy.typing as npt

from tuning.engine import RunResult
from tuning.replica import DONE, DROPPED, REJECTED, Requests


@dataclass(frozen=True)
class Slo:
    """Per request: time to first token and time per output token (the mean gap between
    generated tokens after the first), and optionally a bound on the whole request."""

    ttft_s: float = 2.0
    tpot_s: float = 0.1
    e2e_s: float | None = None

    def describe(self) -> str:
        text = f"TTFT <= {self.ttft_s:g}s and TPOT <= {1000 * self.tpot_s:g}ms"
        return text + (f" and end-to-end <= {self.e2e_s:g}s" if self.e2e_s is not None else "")


def time_per_output_token(r: Requests) -> npt.NDArray[np.float64]:
    """(finish - first token) / (generated - 1) per request; 0 for one token or none."""
    gaps = np.maximum(r.generated - 1, 0).astype(np.float64)
    decode = r.finish - r.first_token
    return np.divide(decode, gaps, out=np.zeros(len(gaps)), where=gaps > 0)


def _pct(values: np.ndarray[Any, np.dtype[np.float64]], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if len(values) else None


def _measured(r: Requests, start: float) -> Requests:
    """The requests that arrived from ``start`` on (all of them when it is 0)."""
    if start > 0:
        keep = r.arrival >= start
        return Requests(*(getattr(r, f.name)[keep] for f in fields(Requests)))
    return r


def _met(done: npt.NDArray[np.bool_], within: npt.NDArray[np.bool_] | bool) -> npt.NDArray[np.bool_]:
    """Per request, whether it met one SLO: ``within`` for the completed ones, False for the rest."""
    ok = np.zeros(len(done), dtype=bool)
    ok[done] = within
    return ok


def summarize(result: RunResult, slo: Slo) -> dict[str, Any]:
    """A JSON-ready summary. Attainment (``slo_both``: every SLO of ``slo`` met) counts
    every request that arrived: rejected and dropped ones miss it. With a warm-up
    (``SimConfig.measure_from_s``) only requests arriving from then on count."""
    start = result.config.measure_from_s
    r = _measured(result.requests, start)
    n = len(r.arrival)
    done = r.status == DONE
    rejected = r.status == REJECTED
    dropped = r.status == DROPPED
    ttft = (r.first_token - r.arrival)[done]
    e2e = (r.finish - r.arrival)[done]
    tpot = time_per_output_token(r)[done]
    ttft_ok = _met(done, ttft <= slo.ttft_s)
    tpot_ok = _met(done, tpot <= slo.tpot_s)
    e2e_ok = _met(done, True if slo.e2e_s is None else e2e <= slo.e2e_s)
    met = ttft_ok & tpot_ok & e2e_ok
    lost = rejected | dropped
    profile = result.config.replica
    replica_hours = result.pod_seconds / 3600
    tl = result.timeline
    within = (tl["t"] <= result.horizon_s) & (tl["t"] >= start)
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
        "slo_tpot": round(float(tpot_ok.mean()), 4) if n else None,
        "slo_e2e": round(float(e2e_ok.mean()), 4) if n and slo.e2e_s is not None else None,
        "slo_both": round(float(met.mean()), 4) if n else None,
        "ttft_p50": _pct(ttft, 50),
        "ttft_p95": _pct(ttft, 95),
        "ttft_p99": _pct(ttft, 99),
        "e2e_p50": _pct(e2e, 50),
        "e2e_p95": _pct(e2e, 95),
        "e2e_p99": _pct(e2e, 99),
        "tpot_p50": _pct(tpot, 50),
        "tpot_p90": _pct(tpot, 90),
        "tpot_p99": _pct(tpot, 99),
        "queue_mean": round(float(queue.mean()), 2) if len(queue) else 0.0,
        "queue_max": int(queue.max()) if len(queue) else 0,
        "replicas_mean": round(float(pods.mean()), 2) if len(pods) else 0.0,
        "replicas_max": int(pods.max()) if len(pods) else 0,
        "scale_ups": result.scale_ups,
        "scale_downs": result.scale_downs,
        "horizon_s": result.horizon_s,
    }
