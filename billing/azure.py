"""Azure Cost Management exports (cost and usage details, CSV) as billing rows (pure).

Both agreements' layouts are read, their column names matched without regard to case:

- Enterprise Agreement (EA): ``Date``, ``CostInBillingCurrency``, ``BillingCurrencyCode``,
  ``MeterCategory``, ``ResourceId``, ``Tags``, ``ChargeType``, ``PricingModel``, ``Quantity``,
  ``UnitOfMeasure``, ``EffectivePrice``;
- Microsoft Customer Agreement (MCA): ``date``, ``costInBillingCurrency``, ``billingCurrency``,
  ``meterCategory``, ``resourceId``, ``tags``, ``chargeType``, ``pricingModel``, ``quantity``,
  ``unitOfMeasure``, ``effectivePrice``.

Actual cost and amortized cost exports share the columns. Rows are daily: a row's cost
covers the UTC day of its ``Date`` (``MM/DD/YYYY`` as the exports write it, or ``YYYY-MM-DD``).
``ChargeType`` ``Purchase`` rows are left out: a reservation's or savings plan's up-front
payment is not the cost of any hour, and the amortized export spreads it over the usage it
covered (in the actual cost export that usage costs 0: read the amortized one). Refunds are
negative costs and count. ``Tags`` is a JSON object, with or without its braces (EA exports
write ``"team": "ml","env": "prod"``). Resource ids compare without regard to case, as Azure
treats them. All rows read must be in one billing currency.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

from billing.rows import BillingRow, Rows

DATE, COST, CURRENCY = "date", "costinbillingcurrency", ("billingcurrencycode", "billingcurrency")
TAGS, RESOURCE, CHARGE_TYPE = "tags", "resourceid", "chargetype"
DETECT = (COST, "metercategory")  # either, beside ``date``
SKIPPED_CHARGES = frozenset({"purchase"})
DAY = timedelta(days=1)
_US_DATE = re.compile(r"^(\d{1,2})/(\d{1,2})/(\d{4})$")
_ISO_DATE = re.compile(r"^(\d{4})-(\d{2})-(\d{2})(?:[T ].*)?$")


def detect(header: list[str]) -> bool:
    names = {column.lower() for column in header}
    return DATE in names and any(column in names for column in DETECT)


def _day(raw: str) -> datetime | None:
    text = raw.strip()
    us = _US_DATE.match(text)
    if us is not None:
        month, day, year = (int(part) for part in us.groups())
    else:
        iso = _ISO_DATE.match(text)
        if iso is None:
            return None
        year, month, day = (int(part) for part in iso.groups())
    try:
        return datetime(year, month, day, tzinfo=UTC)
    except ValueError:
        return None


def read(rows: Rows, cost_column: str | None, wanted_tags: Mapping[str, str]) -> list[BillingRow]:
    """The export's rows (``Purchase`` rows left out); ``RowError`` names row and column."""
    by_name = {column.lower(): column for column in rows.header}

    def column(*names: str) -> str | None:
        return next((by_name[name] for name in names if name in by_name), None)

    date_col = column(DATE)
    cost_col = by_name.get((cost_column or COST).lower())
    if date_col is None:
        rows.require("Date")
    if cost_col is None:
        rows.require(cost_column or "CostInBillingCurrency")
    assert date_col is not None and cost_col is not None
    tags_col, resource_col = column(TAGS), column(RESOURCE)
    charge_col, currency_col = column(CHARGE_TYPE), column(*CURRENCY)
    if wanted_tags and tags_col is None:
        rows.require("Tags")
    out: list[BillingRow] = []
    currency: tuple[int, str] | None = None  # the first row's
    for n in rows:
        if charge_col is not None and rows.cell(charge_col).strip().lower() in SKIPPED_CHARGES:
            continue
        start = _day(rows.cell(date_col))
        if start is None:
            raise rows.error(
                date_col, f"expected a date such as 03/01/2025 or 2025-03-01, got {rows.cell(date_col)!r}"
            )
        cost = rows.number(cost_col)
        if currency_col is not None:
            code = rows.cell(currency_col).strip()
            if currency is None:
                currency = (n, code)
            elif code != currency[1]:
                raise rows.error(
                    currency_col,
                    f"{code!r} is not the currency of row {currency[0]} ({currency[1]!r}): "
                    "reconcile one billing currency at a time",
                )
        row_tags = _tags(rows, tags_col) if tags_col is not None else {}
        resource = rows.cell(resource_col).strip().lower() if resource_col is not None else ""
        out.append(BillingRow(n, start, start + DAY, cost, resource, row_tags))
    return out


def _tags(rows: Rows, column: str) -> dict[str, str]:
    raw = rows.cell(column).strip()
    if not raw:
        return {}
    text = raw if raw.startswith("{") else "{" + raw + "}"
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise rows.error(column, f'expected tags as a JSON object ({{"team": "ml"}}), got {raw[:60]!r}')
    return {str(k): str(v) for k, v in value.items()}
