"""A billing export's rows as the readers see them: ``Rows`` (a CSV whose every bad cell is an
error naming its row and column) and ``BillingRow`` (one row's cost over its period)."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Any

from token_scaler.errors import RowError


@dataclass(frozen=True)
class BillingRow:
    row: int
    start: datetime
    end: datetime
    cost: float
    resource: str
    tags: Mapping[str, str]


def parse_time(raw: str) -> datetime:
    """ISO 8601 (``2025-03-01T13:00:00Z``) or BigQuery's ``2025-03-01 13:00:00 UTC``; naive = UTC."""
    text = raw.strip()
    if text.endswith(" UTC"):
        text = text[:-4] + "+00:00"
    value = datetime.fromisoformat(text)  # ValueError on anything else
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Rows:
    """A CSV with a header; ``cell`` and friends raise ``RowError`` naming row and column."""

    def __init__(self, f: IO[str], source: str) -> None:
        self.source = source
        self.reader = csv.DictReader(f)
        self.header = list(self.reader.fieldnames or [])
        self.current: dict[str, str | None] = {}

    def require(self, *columns: str) -> None:
        missing = [c for c in columns if c not in self.header]
        if missing:
            raise RowError(self.source, 1, missing[0], "no such column in the header")

    def __iter__(self) -> Iterator[int]:
        for record in self.reader:
            if None in record:
                self.current = record
                raise self.error(self.header[-1] if self.header else "?", "more fields than the header")
            self.current = record
            if all(v in (None, "") for v in record.values()):
                continue
            yield self.reader.line_num

    def error(self, column: str, reason: str) -> RowError:
        return RowError(self.source, self.reader.line_num, column, reason)

    def cell(self, column: str) -> str:
        value = self.current.get(column)
        if value is None:
            raise self.error(column, "missing: the row has fewer fields than the header")
        return value

    def time(self, column: str) -> datetime:
        raw = self.cell(column)
        try:
            return parse_time(raw)
        except ValueError:
            raise self.error(
                column, f"expected a date and time such as 2025-03-01T13:00:00Z, got {raw!r}"
            ) from None

    def number(self, column: str) -> float:
        raw = self.cell(column)
        try:
            value = float(raw)
        except ValueError:
            raise self.error(column, f"expected a number, got {raw!r}") from None
        if not math.isfinite(value):
            raise self.error(column, f"expected a finite number, got {raw!r}")
        return value

    def count(self, column: str) -> int:
        raw = self.cell(column)
        try:
            value = int(raw)
        except ValueError:
            raise self.error(column, f"expected a whole number, got {raw!r}") from None
        if value < 0:
            raise self.error(column, f"expected a count of 0 or more, got {raw!r}")
        return value

    def json(self, column: str) -> Any:
        raw = self.cell(column)
        if not raw.strip():
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise self.error(column, f"expected JSON, got {raw[:60]!r}") from None
