"""Cost per 1k tokens and spend per hour of each workload the scaler follows.

Replicas are the workload's live sidecars (one per pod), priced by the price table
(``--prices``); token rates are the served tokens (prompt + generated) of the last
``COST_WINDOW_S`` complete seconds, on Redis' clock, divided by the seconds the data
covers; tenant shares come from the per-tenant counts of the same seconds. Shown in
``/debug/scalers`` and exported as gauges at scrape time, so a workload that is no
longer followed leaves no stale series behind. Read-only: it never touches the
window maths nor what KEDA is answered.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from scaler.reader import StreamReader
from scaler.series import TENANT_WINDOW_S, WorkloadSeries
from token_scaler.pricing import PriceTable, WorkloadCost, workload_cost

COST_WINDOW_S = TENANT_WINDOW_S


def series_cost(
    series: WorkloadSeries, prices: PriceTable, workload: str, now_ms: int, liveness_ms: int
) -> WorkloadCost | str:
    """The cost view of one workload's series, or why there is none."""
    s = now_ms // 1000
    start = s - COST_WINDOW_S
    covered, tenant_totals = series.tenant_window(now_ms)
    rates: dict[str, float] = {}
    for model, ring in series.rings.items():
        if model is None:
            continue
        counts = ring.window(start, s)
        tokens = float(counts[0].sum() + counts[1].sum())  # served prompt + served generation
        rates[model] = tokens / covered if covered >= 1 else 0.0
    price = prices.replica_price(workload, rates)
    if isinstance(price, str):
        return price
    tenant_tokens = {key: float(prompt + gen) for key, (prompt, gen) in tenant_totals.items()}
    replicas = len(series.live_sidecars(now_ms, liveness_ms))
    flowing = {m: r for m, r in rates.items() if r != 0}
    return workload_cost(price, replicas, flowing, tenant_tokens)


def describe_cost(cost: WorkloadCost | str | None, currency: str) -> dict[str, Any]:
    """The ``cost`` section of ``/debug/scalers``."""
    if cost is None:
        return {"priced": False, "reason": "no price table: start the scaler with --prices"}
    if isinstance(cost, str):
        return {"priced": False, "reason": cost}

    def r(x: float | None) -> float | None:
        return None if x is None else float(f"{x:.6g}")

    p = cost.replica_price
    return {
        "priced": True,
        "currency": currency,
        "windowSeconds": COST_WINDOW_S,
        "replicas": cost.replicas,
        "replicasFrom": "live sidecars (one per pod)",
        "instanceType": p.instance_type,
        "instancesPerReplica": p.instances_per_replica,
        "pricePerReplicaPerHour": r(p.hourly),
        "priceFrom": p.source,
        "costPerHour": r(cost.hourly_cost),
        "tokensPerSecond": round(cost.tokens_per_second, 3),
        "costPer1kTokens": r(cost.cost_per_1k_tokens),
        "models": {
            m: {
                "tokensPerSecond": round(mc.tokens_per_second, 3),
                "spendPerHour": r(mc.spend_per_hour),
                "costPer1kTokens": r(mc.cost_per_1k_tokens),
            }
            for m, mc in sorted(cost.models.items())
        },
        "spendPerHourByTenant": {t: r(v) for t, v in sorted(cost.tenant_totals().items())},
        "note": (
            "costPer1kTokens is null while no tokens flow (the replicas' cost is then idle); "
            "spend is shared out by tokens served"
        ),
    }


class CostCollector(Collector):
    """``tokenscaler_cost_*`` and ``tokenscaler_spend_*`` gauges, computed at scrape time."""

    def __init__(self, reader: StreamReader, prices: PriceTable) -> None:
        self.reader = reader
        self.prices = prices

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(self._families())

    def _families(self) -> tuple[GaugeMetricFamily, GaugeMetricFamily, GaugeMetricFamily]:
        hourly = GaugeMetricFamily(
            "tokenscaler_cost_dollars_per_hour",
            "What the workload's live replicas cost per hour, by the price table (idle ones included)",
            labels=["namespace", "workload"],
        )
        per_1k = GaugeMetricFamily(
            "tokenscaler_cost_per_1k_tokens",
            "Cost of 1,000 tokens (prompt + generated) at the last minute's rates; absent while idle",
            labels=["namespace", "workload", "model"],
        )
        spend = GaugeMetricFamily(
            "tokenscaler_spend_dollars_per_hour",
            "Share of the workload's hourly cost by model and tenant, by tokens served in the last minute",
            labels=["namespace", "workload", "model", "tenant"],
        )
        return hourly, per_1k, spend

    def collect(self) -> Iterator[GaugeMetricFamily]:
        hourly, per_1k, spend = self._families()
        now = self.reader.now_ms()
        for workload, series in sorted(self.reader.series.items()):
            cost = series_cost(series, self.prices, workload, now, self.reader.liveness_ms)
            if isinstance(cost, str):
                continue
            namespace, name = workload.split("/", 1)
            hourly.add_metric([namespace, name], cost.hourly_cost)
            for model, mc in sorted(cost.models.items()):
                if mc.cost_per_1k_tokens is not None:
                    per_1k.add_metric([namespace, name, model], mc.cost_per_1k_tokens)
            for tenant, per_model in sorted(cost.tenants.items()):
                for model, amount in sorted(per_model.items()):
                    spend.add_metric([namespace, name, model, tenant], amount)
        yield from (hourly, per_1k, spend)
