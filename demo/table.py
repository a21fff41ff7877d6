"""The demo's table: one row a second, every column with its unit, and the summary.

Raw tokens are counted as served; weighted tokens are what a replica's capacity is measured
in (``prompt weight x prompt tokens + generation weight x generated tokens``), and what the
scaler's demand and KEDA's metric are in. At the model servers, a request is either queued
(admitted by no batch yet) or in flight (in a batch, being served).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Row:
    t: float  # seconds since the load started
    phase: str  # the scenario's phase at ``t``: "" outside it
    arrivals_rps: float  # requests sent per second, over the scaler's window so far
    served_prompt: float  # raw prompt tokens/s served (the scaler's window)
    served_generation: float  # raw generated tokens/s served
    demand: float  # weighted tokens/s the scaler sees asked for
    value: float  # the metric KEDA receives (weighted tokens/s, headroom included)
    target: float  # KEDA's target per replica (weighted tokens/s)
    requests_replicas: int  # what a requests/s scaler calibrated on the trace would run
    queued: int
    in_flight: int
    rule: str  # which of the scaler's rules decided (its debug view)

    @property
    def replicas(self) -> int:
        """What KEDA's HPA would run: ceil(metric / target)."""
        return math.ceil(self.value / self.target - 1e-9) if self.value > 0 else 0


@dataclass(frozen=True)
class Column:
    group: str
    title: str
    width: int
    cell: Callable[[Row], str]


COLUMNS = (
    Column("time", "s", 5, lambda r: f"{r.t:.0f}"),
    Column("phase", "", 12, lambda r: r.phase),
    Column("arrivals", "req/s", 8, lambda r: f"{r.arrivals_rps:.1f}"),
    Column("served, raw tok/s", "prompt", 8, lambda r: f"{r.served_prompt:.0f}"),
    Column("", "generated", 9, lambda r: f"{r.served_generation:.0f}"),
    Column("weighted tok/s", "demand", 7, lambda r: f"{r.demand:.0f}"),
    Column("", "KEDA metric", 11, lambda r: f"{r.value:.0f}"),
    Column("HPA replicas", "by tokens", 9, lambda r: str(r.replicas)),
    Column("", "by req/s", 8, lambda r: str(r.requests_replicas)),
    Column("model servers", "queued", 7, lambda r: str(r.queued)),
    Column("", "in flight", 9, lambda r: str(r.in_flight)),
    Column("scaler", "rule", 14, lambda r: r.rule),
)


def _line(cells: list[str]) -> str:
    return " | ".join(
        cell.ljust(c.width) if c.title in ("", "rule") else cell.rjust(c.width)
        for c, cell in zip(COLUMNS, cells, strict=True)
    ).rstrip()


def header() -> str:
    groups = []
    for i, c in enumerate(COLUMNS):
        # a group title spans its column and the untitled ones after it
        span = COLUMNS[i : i + 1 + _untitled_after(i)]
        width = sum(d.width for d in span) + 3 * (len(span) - 1)
        groups.append(c.group.center(width) if c.group else "")
    top = " | ".join(g for c, g in zip(COLUMNS, groups, strict=True) if c.group).rstrip()
    return top + "\n" + _line([c.title for c in COLUMNS])


def _untitled_after(i: int) -> int:
    n = 0
    for c in COLUMNS[i + 1 :]:
        if c.group:
            break
        n += 1
    return n


def format_row(row: Row) -> str:
    return _line([c.cell(row) for c in COLUMNS])
