"""Billing exports and hourly token counts, reconciled into an empirical cost per 1k tokens (pure).

Billing CSV layouts (the header decides, or ``layout=``):

- ``aws``: the Cost and Usage Report (legacy CUR): ``lineItem/UsageStartDate``,
  ``lineItem/UsageEndDate``, ``lineItem/UnblendedCost`` (or another cost column),
  ``lineItem/ResourceId``, and one ``resourceTags/<key>`` column per cost allocation tag,
  e.g. ``resourceTags/user:app``.
- ``azure``: Azure Cost Management's cost and usage details export (actual or amortized
  cost, EA or MCA column names): ``Date``, ``CostInBillingCurrency``, ``Tags``,
  ``ResourceId``, ``ChargeType`` (azure.py says more);
- ``gcp``: Cloud Billing's BigQuery export saved as CSV: ``usage_start_time``,
  ``usage_end_time``, ``cost``, ``credits`` (JSON list of ``{name, amount}``, added to the
  cost: credits are negative), ``labels`` (JSON list of ``{key, value}`` as
  ``TO_JSON_STRING(labels)`` gives, or a JSON object), ``resource.name`` or
  ``resource.global_name`` (detailed export).

A row's cost is spread over the UTC hours its usage period overlaps, in proportion to
the overlap (hourly rows fall in one hour; daily rows over 24). Row numbers in errors
count the header as row 1, as a spreadsheet does.

Hourly token counts CSV (what ``token-scaler cost tokens`` writes)::

    hour,workload,model,prompt_tokens,generation_tokens,requests
    2025-03-01T13:00:00Z,llm/vllm,llama-8b,1200000,3400000,5100

Reconciliation: over the hours that have both a billed cost and token counts, each
hour's cost goes to the models by their share of that hour's tokens (prompt + generated);
the cost of hours with counts but no tokens (idle replicas) goes to the models by their
share of all tokens. Empirical cost per 1k tokens = cost / tokens x 1000. Hours billed
but not counted, and counted but not billed yet, are left out and reported.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import IO

from billing import azure
from billing.rows import BillingRow, Rows
from token_scaler.errors import RowError

HOUR = timedelta(hours=1)

AWS_START, AWS_END, AWS_COST, AWS_RESOURCE = (
    "lineItem/UsageStartDate",
    "lineItem/UsageEndDate",
    "lineItem/UnblendedCost",
    "lineItem/ResourceId",
)
AWS_TAG_PREFIX = "resourceTags/"
GCP_START, GCP_END, GCP_COST, GCP_CREDITS, GCP_LABELS = (
    "usage_start_time",
    "usage_end_time",
    "cost",
    "credits",
    "labels",
)
GCP_RESOURCES = ("resource.name", "resource.global_name")
TOKEN_COLUMNS = ("hour", "workload", "model", "prompt_tokens", "generation_tokens", "requests")


@dataclass
class HourlyTokens:
    hour: datetime
    workload: str
    model: str
    prompt: int = 0
    generation: int = 0
    requests: int = 0

    @property
    def tokens(self) -> int:
        return self.prompt + self.generation


# --- parsing helpers ---------------------------------------------------------------


def hour_of(t: datetime) -> datetime:
    return t.replace(minute=0, second=0, microsecond=0)


def format_hour(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:00:00Z")


# --- billing exports ---------------------------------------------------------------


def detect_layout(header: Sequence[str]) -> str:
    if AWS_START in header or any(c.startswith("lineItem/") for c in header):
        return "aws"
    if GCP_START in header:
        return "gcp"
    if azure.detect(list(header)):
        return "azure"
    raise RowError(
        "", 1, header[0] if header else "", "neither an AWS CUR, a GCP nor an Azure billing export header"
    )


def read_billing(
    f: IO[str],
    source: str = "billing",
    *,
    layout: str = "auto",
    cost_column: str | None = None,
    tags: Mapping[str, str] | None = None,
    resources: Sequence[str] = (),
) -> list[BillingRow]:
    """The rows of a billing export that match every tag and (when given) one of ``resources``."""
    rows = Rows(f, source)
    if layout == "auto":
        try:
            layout = detect_layout(rows.header)
        except RowError as exc:
            raise RowError(source, 1, exc.column, exc.reason) from None
    wanted = dict(tags or {})
    out: list[BillingRow] = []
    if layout == "aws":
        cost_col = cost_column or AWS_COST
        rows.require(AWS_START, cost_col)
        tag_columns = {c[len(AWS_TAG_PREFIX) :]: c for c in rows.header if c.startswith(AWS_TAG_PREFIX)}
        for key in wanted:
            if key not in tag_columns:
                raise RowError(source, 1, AWS_TAG_PREFIX + key, "no such tag column in the header")
        for n in rows:
            start = rows.time(AWS_START)
            end = rows.time(AWS_END) if AWS_END in rows.header else start + HOUR
            row_tags = {k: rows.cell(c) for k, c in tag_columns.items()}
            resource = rows.cell(AWS_RESOURCE) if AWS_RESOURCE in rows.header else ""
            out.append(BillingRow(n, start, end, rows.number(cost_col), resource, row_tags))
    elif layout == "gcp":
        cost_col = cost_column or GCP_COST
        rows.require(GCP_START, cost_col)
        if wanted and GCP_LABELS not in rows.header:
            raise RowError(source, 1, GCP_LABELS, "no such column: export it with TO_JSON_STRING(labels)")
        resource_col = next((c for c in GCP_RESOURCES if c in rows.header), None)
        for n in rows:
            start = rows.time(GCP_START)
            end = rows.time(GCP_END) if GCP_END in rows.header else start + HOUR
            cost = rows.number(cost_col)
            if GCP_CREDITS in rows.header:
                cost += _credits(rows)
            row_tags = _labels(rows) if GCP_LABELS in rows.header else {}
            resource = rows.cell(resource_col) if resource_col else ""
            out.append(BillingRow(n, start, end, cost, resource, row_tags))
    elif layout == "azure":
        out = azure.read(rows, cost_column, wanted)
        resources = [r.lower() for r in resources]  # Azure resource ids are not case-sensitive
    else:
        raise ValueError(f"unknown billing layout {layout!r}: expected auto, aws, gcp or azure")
    for row in out:
        if row.end < row.start:
            raise RowError(source, row.row, AWS_END if layout == "aws" else GCP_END, "ends before it starts")
    return [
        r
        for r in out
        if all(r.tags.get(k) == v for k, v in wanted.items()) and (not resources or r.resource in resources)
    ]


def _credits(rows: Rows) -> float:
    value = rows.json(GCP_CREDITS)
    if value is None:
        return 0.0
    if not isinstance(value, list):
        raise rows.error(GCP_CREDITS, "expected a JSON list of {name, amount}")
    total = 0.0
    for credit in value:
        amount = credit.get("amount") if isinstance(credit, dict) else None
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) or not math.isfinite(amount):
            raise rows.error(GCP_CREDITS, f"a credit without a numeric amount: {credit!r}")
        total += amount
    return total


def _labels(rows: Rows) -> dict[str, str]:
    value = rows.json(GCP_LABELS)
    if value is None:
        return {}
    if isinstance(value, dict):
        return {str(k): str(v) for k, v in value.items()}
    if isinstance(value, list) and all(isinstance(x, dict) and "key" in x for x in value):
        return {str(x["key"]): str(x.get("value", "")) for x in value}
    raise rows.error(GCP_LABELS, 'expected a JSON list of {"key": ..., "value": ...} or a JSON object')


def hourly_cost(rows: Iterable[BillingRow]) -> dict[datetime, float]:
    """Cost per UTC hour, each row spread over the hours its usage period overlaps."""
    out: dict[datetime, float] = {}
    for row in rows:
        length = (row.end - row.start).total_seconds()
        if length <= 0:
            out[hour_of(row.start)] = out.get(hour_of(row.start), 0.0) + row.cost
            continue
        hour = hour_of(row.start)
        while hour < row.end:
            overlap = (min(row.end, hour + HOUR) - max(row.start, hour)).total_seconds()
            out[hour] = out.get(hour, 0.0) + row.cost * overlap / length
            hour += HOUR
    return out


# --- hourly token counts -----------------------------------------------------------


def read_tokens(f: IO[str], source: str = "tokens") -> list[HourlyTokens]:
    rows = Rows(f, source)
    rows.require(*TOKEN_COLUMNS)
    out = []
    for _ in rows:
        hour = rows.time("hour")
        if hour != hour_of(hour):
            raise rows.error("hour", f"expected the start of an hour, got {rows.cell('hour')!r}")
        out.append(
            HourlyTokens(
                hour,
                rows.cell("workload"),
                rows.cell("model"),
                rows.count("prompt_tokens"),
                rows.count("generation_tokens"),
                rows.count("requests"),
            )
        )
    return out


def write_tokens(f: IO[str], counts: Iterable[HourlyTokens]) -> None:
    writer = csv.writer(f, lineterminator="\n")
    writer.writerow(TOKEN_COLUMNS)
    for c in sorted(counts, key=lambda c: (c.hour, c.workload, c.model)):
        writer.writerow([format_hour(c.hour), c.workload, c.model, c.prompt, c.generation, c.requests])


def merge_tokens(*groups: Iterable[HourlyTokens]) -> list[HourlyTokens]:
    """Sum counts of the same (hour, workload, model)."""
    merged: dict[tuple[datetime, str, str], HourlyTokens] = {}
    for group in groups:
        for c in group:
            key = (c.hour, c.workload, c.model)
            m = merged.setdefault(key, HourlyTokens(c.hour, c.workload, c.model))
            m.prompt += c.prompt
            m.generation += c.generation
            m.requests += c.requests
    return list(merged.values())


# --- reconciliation ----------------------------------------------------------------


@dataclass
class ModelResult:
    model: str
    prompt_tokens: int = 0
    generation_tokens: int = 0
    cost: float = 0.0

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.generation_tokens

    @property
    def cost_per_1k_tokens(self) -> float | None:
        return self.cost / self.tokens * 1000 if self.tokens > 0 else None


@dataclass
class Reconciliation:
    models: dict[str, ModelResult] = field(default_factory=dict)
    hours: int = 0
    idle_hours: int = 0
    idle_cost: float = 0.0
    billed_not_counted: list[datetime] = field(default_factory=list)
    billed_not_counted_cost: float = 0.0
    counted_not_billed: list[datetime] = field(default_factory=list)

    @property
    def total(self) -> ModelResult:
        total = ModelResult("(all)")
        for m in self.models.values():
            total.prompt_tokens += m.prompt_tokens
            total.generation_tokens += m.generation_tokens
            total.cost += m.cost
        return total


def reconcile(costs: Mapping[datetime, float], counts: Iterable[HourlyTokens]) -> Reconciliation:
    by_hour: dict[datetime, dict[str, HourlyTokens]] = {}
    for c in merge_tokens([HourlyTokens(c.hour, "", c.model, c.prompt, c.generation) for c in counts]):
        by_hour.setdefault(c.hour, {})[c.model] = c
    result = Reconciliation()
    result.billed_not_counted = sorted(h for h in costs if h not in by_hour)
    result.billed_not_counted_cost = sum(costs[h] for h in result.billed_not_counted)
    result.counted_not_billed = sorted(h for h in by_hour if h not in costs)
    for hour in sorted(h for h in costs if h in by_hour):
        result.hours += 1
        models = by_hour[hour]
        hour_tokens = sum(c.tokens for c in models.values())
        for model, c in models.items():
            m = result.models.setdefault(model, ModelResult(model))
            m.prompt_tokens += c.prompt
            m.generation_tokens += c.generation
            if hour_tokens > 0:
                m.cost += costs[hour] * c.tokens / hour_tokens
        if hour_tokens <= 0:
            result.idle_hours += 1
            result.idle_cost += costs[hour]
    all_tokens = sum(m.tokens for m in result.models.values())
    if all_tokens > 0:
        for m in result.models.values():
            m.cost += result.idle_cost * m.tokens / all_tokens
    return result
