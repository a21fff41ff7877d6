"""The per-minute history the forecast reads (``scaler/forecast.py``), kept in Redis.

Keys, one hash a workload and a UTC day, expiring ``HISTORY_DAYS`` + 1 days after the day::

    tokenscaler:v1:{<namespace>/<name>}:minutes:<day>    field "<minute>" (all models) or
                                                          "<minute>:<model>", value "sp,sg,ap,ag,ar"

Every scaler replica reads the same stream, so each writes the same counts for a minute;
a field is written once (``HSETNX``), by whichever replica gets there first, after the
minute has ended and ``SETTLE_S`` more seconds have passed for late entries. A minute
the data does not cover whole (the scaler started in it, or the stream was trimmed past
it) is not written. A restarted scaler reads the history back, so a forecast survives
restarts; a field that is not four or five values, or whose four token counts are not
numbers >= 0, is skipped and counted, not trusted. The fifth, ``ar``, the requests that
arrived, is left out where unknown (fields written before it was kept, minutes holding a
record that does not count arrivals); one that is not a count >= 0 reads as unknown.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from scaler.forecast import DAY_MIN, HISTORY_DAYS, MINUTE_S, MinuteCounts
from scaler.series import WorkloadSeries

log = logging.getLogger("token_scaler.scaler.history")

SETTLE_S = 5
TTL_S = (HISTORY_DAYS + 1) * 86400


def history_key(workload: str, day: int) -> str:
    return f"tokenscaler:v1:{{{workload}}}:minutes:{day}"


def _field(minute: int, model: str | None) -> str:
    return str(minute) if model is None else f"{minute}:{model}"


@dataclass
class WorkloadHistory:
    """One workload's minutes, per model (None: all models), as read and written."""

    minutes: dict[str | None, dict[int, MinuteCounts]] = field(default_factory=dict)
    loaded: bool = False
    written_through: int | None = None  # the last minute handed to Redis
    bad_fields: int = 0

    def of(self, model: str | None) -> dict[int, MinuteCounts]:
        return self.minutes.setdefault(model, {})

    def prune(self, now_min: int) -> None:
        oldest = now_min - HISTORY_DAYS * DAY_MIN
        for per_model in self.minutes.values():
            for minute in [m for m in per_model if m < oldest]:
                del per_model[minute]


class HistoryStore:
    """Reads and extends the history of every workload the scaler follows."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.workloads: dict[str, WorkloadHistory] = {}

    def get(self, workload: str) -> WorkloadHistory:
        return self.workloads.setdefault(workload, WorkloadHistory())

    async def load(self, workload: str, now_s: float) -> WorkloadHistory:
        """Read the stored days once per workload (then ``update`` keeps it current)."""
        history = self.get(workload)
        if history.loaded:
            return history
        today = int(now_s // 86400)
        pipe = self.client.pipeline(transaction=False)
        for day in range(today - HISTORY_DAYS, today + 1):
            pipe.hgetall(history_key(workload, day))
        for mapping in await pipe.execute():
            for raw_field, raw_value in mapping.items():
                self._take(history, _text(raw_field), _text(raw_value))
        history.loaded = True
        return history

    def _take(self, history: WorkloadHistory, name: str, value: str) -> None:
        minute_text, _, model = name.partition(":")
        try:
            minute = int(minute_text)
            counts = MinuteCounts.decode(value)
        except ValueError as exc:
            history.bad_fields += 1
            log.warning("history field %r skipped: %s", name, exc)
            return
        history.of(model or None)[minute] = counts

    async def update(self, workload: str, series: WorkloadSeries, now_s: float) -> int:
        """Add every minute ended (and settled) since the last update, for all models and each
        model, to memory and Redis; the number of minutes written."""
        history = self.get(workload)
        last_done = int((now_s - SETTLE_S) // MINUTE_S) - 1
        first = history.written_through + 1 if history.written_through is not None else last_done
        fresh: list[tuple[int, str | None, MinuteCounts]] = []
        for minute in range(max(first, last_done - 30), last_done + 1):
            for model in series.rings:
                counts = series.minute_counts(minute, model)
                if counts is not None:
                    fresh.append((minute, model, counts))
        history.written_through = last_done
        if not fresh:
            return 0
        pipe = self.client.pipeline(transaction=False)
        days = set()
        for minute, model, counts in fresh:
            history.of(model).setdefault(minute, counts)
            day = minute // DAY_MIN
            days.add(day)
            pipe.hsetnx(history_key(workload, day), _field(minute, model), counts.encode())
        for day in days:
            pipe.expireat(history_key(workload, day), (day + 1) * 86400 + TTL_S)
        await pipe.execute()
        history.prune(last_done)
        return len(fresh)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
