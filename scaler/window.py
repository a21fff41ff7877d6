"""Rolling token rates, demand and panic: the scaler's algorithm, pure (no I/O).

Counts from the stream are summed into per-second buckets (``scaler.series``), per
model and for all models together. ``evaluate`` reads complete seconds only: at
Redis time ``now`` the stable window is the ``W`` whole seconds before
``floor(now)``, so every scaler replica that has read the same entries gives the
same answer for the same second, and a count shows one second after the flush
that carried it at the latest.

Demand. For each window, with weights ``pw``/``gw``::

    served  = (pw * served_prompt  + gw * served_generation)  / covered seconds
    arrived = (pw * arrived_prompt + gw * arrived_generation) / covered seconds
    demand  = arrived if arrived >= served * (1 + arrivalMargin) else served

``arrived`` counts tokens of requests as they arrive (estimates, corrected to the
real usage when they end), so it keeps growing when replicas are saturated while
``served`` cannot; ``served`` wins while a queue drains. In steady state both equal
the real token rate. With ``arrivalMargin`` 0, the default, the demand is the higher
of the two; ``scaler.demand`` says when a margin, or none (``off``), pays. The panic
window and the burst envelope, which look for bursts, take the higher of the two.
With ``sizeWindowSeconds`` the stable window's demand is instead its arriving requests
per second times their size measured over a longer span (``scaler.size``).

Coverage. Right after a start, or after Redis lost its data, the window holds fewer
seconds than asked for: rates divide by the seconds actually covered
(``now - first data``), never by the full window, so a fresh scaler does not
under-report the load that just arrived.

Panic (after Knative's KPA). For each whole second ``g`` of the last
``panicHoldSeconds`` the panic-window demand is computed without the window's busiest
second (a request's arrival estimate is corrected to its usage in the second it ends,
so one long generation is a one-second spike; a burst raises every second and survives
the trim; the debug view's panic rates are the untrimmed ones); ``g`` triggers when the
replicas it asks for are >= ``panicThreshold`` x the replicas running at ``g``: the
most of the replicas reporting, those the stable window asks for, and 1. Against the
replicas reporting, as Knative compares the panic window's pods with the pods ready
now, a burst the running replicas can absorb does not panic, and a fleet that grew
after a burst stops panicking once it has; against the stable window's, noise does
not panic while pods are still starting. The replicas reporting are the sidecars' records
per second (each live sidecar flushes one a second, idle or not), averaged over the
``PRESENCE_S`` seconds before ``g``. While a second of the last ``panicHoldSeconds``
triggered, the value is the highest demand (stable or panic) of those seconds; panic
ends ``panicHoldSeconds`` after the last trigger, so a burst costs only while it lasts
(the HPA's scale-down stabilization keeps the pods it asked for; holding the value
longer would only hold them again). The default hold, 15 s, is one HPA sync: a trigger
between two syncs is seen by the next. The decision is a function of the buckets
only, so scaler replicas agree.

Burst envelope (``burstWindowSeconds`` > 0). The stable window sizes for the mean; a
replica that starts in two minutes cannot serve a burst of ten seconds, so on bursty
traffic the capacity that meets a time-to-first-token target is set by how high the
bursts run, not by the mean. The envelope is the ``burstQuantile`` of the demand of
every ``burstWindowSeconds`` window (sliding by one second, served and arrived as for
the stable window) that ends in the last ``burstLookbackSeconds`` and lies wholly
within the data, and the value is at least that. It follows the bursts of the last
minutes up and down, where a panic hold keeps only the highest. It reads the same
buckets as the rest, at most as far back as the streams keep entries, so replicas agree.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from itertools import accumulate

import numpy as np
import numpy.typing as npt

from scaler.demand import DEFAULT_MARGIN, arrivals_lead, demand_of, demands_of
from scaler.metadata import ScalerSettings
from scaler.series import Floats, SecondRing, WorkloadSeries
from scaler.size import SIZED_RANGE, Size, sized_demand, sized_demands

# The replicas reporting at a second: the mean of the sidecar records per second over
# this many seconds before it (flushes jitter across second boundaries).
PRESENCE_S = 4


@dataclass(frozen=True)
class Rates:
    """Token rates over one window, per second."""

    seconds: float
    served_prompt: float
    served_generation: float
    arrived_prompt: float
    arrived_generation: float
    requests: float
    served: float
    arrived: float
    margin: float = DEFAULT_MARGIN  # arrivalMargin: how far arrivals must outrun served to count
    arrived_requests: float = 0.0
    unknown_arrivals: float = 0.0  # model rows per second from writers that do not count arrivals
    size: float = 0.0  # weighted tokens per arriving request (``scaler.size``); 0: not sized

    @property
    def sized(self) -> bool:
        """Whether the demand is the arriving requests times their size (``scaler.size``): a
        size is known, and the window counts arrivals, from every writer."""
        return self.size > 0 and self.arrived_requests > 0 and self.unknown_arrivals == 0

    @property
    def arrivals_lead(self) -> bool:
        """Whether the arrival rate is the demand (``scaler.demand``)."""
        return arrivals_lead(self.served, self.arrived, self.margin)

    @property
    def demand(self) -> float:
        if self.sized:
            return sized_demand(self.arrived_requests, self.size, max(self.served, self.arrived))
        return demand_of(self.served, self.arrived, self.margin)

    @property
    def leading(self) -> str:
        """Which rate is the demand: "sized" (requests times size), "arrival" or "served"."""
        if self.sized:
            return "sized"
        return "arrival" if self.arrivals_lead else "served"


@dataclass(frozen=True)
class Evaluation:
    second: int
    coverage_s: float
    stable: Rates
    panic: Rates
    panic_active: bool
    panic_since: int | None
    value: float
    target: float
    replicas: int
    active: bool
    rule: str
    reason: str
    envelope: float = 0.0  # the burst envelope, weighted tokens/s (0 when off or not yet known)


def _rates(
    sums: Sequence[float], seconds: float, pw: float, gw: float, margin: float = DEFAULT_MARGIN
) -> Rates:
    if seconds < 1:
        return Rates(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, margin)
    sp, sg, ap, ag, rq, ar, na = (x / seconds for x in sums)
    return Rates(seconds, sp, sg, ap, ag, rq, pw * sp + gw * sg, pw * ap + gw * ag, margin, ar, na)


def _reporting(series: WorkloadSeries, first: int, count: int) -> list[float]:
    """The replicas reporting at each of the ``count`` seconds from ``first`` on:
    sidecar-seconds per second over the ``PRESENCE_S`` seconds before it (fewer at the
    start of the data). Plain floats: a few seconds' counts, read once."""
    start = first - PRESENCE_S
    cum = [0.0]
    cum += accumulate(row[0] for row in series.presence.rows(start, first + count - 1))
    first_sec = series.first_sec or 0
    out = []
    for i in range(count):
        known = min(max(first + i - first_sec, 1), PRESENCE_S)  # seconds of data before it
        out.append((cum[PRESENCE_S + i] - cum[PRESENCE_S + i - known]) / known)
    return out


def _served_arrived(counts: Floats, pw: float, gw: float) -> Floats:
    """Weighted served (row 0) and arrived (row 1) tokens per second of ``counts``."""
    out: Floats = pw * counts[0:4:2] + gw * counts[1:4:2]
    return out


def _cumulative(rows: Floats) -> Floats:
    """Running sums along each row, with a leading 0: ``cum[:, j]`` sums the first ``j``."""
    cum = np.zeros((rows.shape[0], rows.shape[1] + 1))
    np.add.accumulate(rows, axis=1, out=cum[:, 1:])
    return cum


@functools.cache
def _window_index(lo: int, count: int, width: int) -> npt.NDArray[np.int64]:
    """``[i, j]``: index ``lo + i - width + j``, the seconds of the ``width`` window ending
    (exclusive) at index ``lo + i``, for ``count`` such ends (read-only)."""
    index = np.arange(lo, lo + count)[:, None] - width + np.arange(width)
    index.flags.writeable = False
    return index


def _trimmed_demand(
    counts: Floats, lo: int, count: int, wp: int, cover: Floats | float, pw: float, gw: float
) -> Floats:
    """The panic window's demand without its busiest second, for each window ending (exclusive)
    at the ``count`` indices of ``counts`` from ``lo`` on. A request's arrival estimate is
    corrected to its usage in the second it ends, so one long generation puts a spike in a
    single second; a burst of requests raises every second of the window, and survives the
    trim. ``cover``, the seconds of data each window covers (one number when the same for
    all), never decreases along the windows."""
    per_second = _served_arrived(counts, pw, gw)
    cum = _cumulative(per_second)
    sums = cum[:, lo : lo + count] - cum[:, lo - wp : lo - wp + count]
    busiest = np.maximum.reduce(per_second[:, _window_index(lo, count, wp)], axis=2)
    least = cover if isinstance(cover, float) else cover[0]
    if least >= 2:  # every window covers two seconds or more: each one trimmed
        demand = (sums - np.maximum(busiest, 0.0)) / (cover - 1)
    else:
        kept = np.maximum(cover - 1, 1.0)
        whole = sums / np.maximum(cover, 1.0)
        trimmed = np.where(cover >= 2, (sums - np.maximum(busiest, 0.0)) / kept, whole)
        demand = np.where(cover >= 1, trimmed, 0.0)
    out: Floats = np.maximum(np.maximum(0.0, demand[0]), demand[1])
    return out


def burst_envelope(ring: SecondRing, first_sec: int, s: int, settings: ScalerSettings) -> tuple[float, int]:
    """The ``burstQuantile`` of the demand of the ``burstWindowSeconds`` windows ending by
    second ``s`` (exclusive) within the lookback and the data, and how many windows that is
    (0: none yet, the envelope is 0)."""
    b = settings.burst_window_s
    start = max(first_sec, s - settings.burst_lookback_s)
    if b <= 0 or s - start < b:
        return 0.0, 0
    cum = _cumulative(
        _served_arrived(ring.window(start, s), settings.prompt_weight, settings.generation_weight)
    )
    windows = (cum[:, b:] - cum[:, :-b]) / b
    demand = np.maximum(np.maximum(np.zeros(s - start - b + 1), windows[0]), windows[1])
    return float(np.quantile(demand, settings.burst_quantile)), len(demand)


def stable_reason(window_s: int, stable: Rates, size: Size | None = None) -> str:
    """Why the stable window's demand is the rate it is (``scaler.demand``, ``scaler.size``)."""
    if size is not None and stable.sized:
        unbound = stable.arrived_requests * stable.size
        reason = (
            f"{window_s}s window demand = {stable.arrived_requests:.2f} arriving requests/s x "
            f"{size.describe()} = {unbound:.1f} weighted tokens/s"
        )
        if stable.demand != unbound:
            rate = max(stable.served, stable.arrived)
            reason += f", held to {stable.demand:.1f}: within {SIZED_RANGE:g}x of the token rate {rate:.1f}"
        return reason
    reason = f"{window_s}s window demand = {stable.leading} rate {stable.demand:.1f} weighted tokens/s"
    if stable.margin == 0:
        return reason
    if math.isinf(stable.margin):
        return reason + f" (arrivalMargin off; arrival rate {stable.arrived:.1f})"
    if stable.arrivals_lead:
        return reason + f" (over {1 + stable.margin:g}x the served rate {stable.served:.1f})"
    return reason + f" (arrival rate {stable.arrived:.1f}, within {1 + stable.margin:g}x of it)"


def replicas_for(value: float, target: float) -> int:
    """What KEDA's HPA derives with metricType AverageValue: ceil(value / target)."""
    return math.ceil(value / target - 1e-9) if value > 0 else 0


class _Span:
    """The counts one evaluation at second ``s`` reads: the ``W + hold`` seconds before ``s``
    (``counts``, one row per series) and their running sums (``cum``). Each of the ``hold``
    seconds ``g = s - hold + 1 .. s`` that may hold panic is the end (exclusive) of a stable
    window and of a panic window; they are the indices ``lo .. n`` of ``cum``, and
    ``first_known`` is how many seconds of data lie before the first of them."""

    def __init__(self, ring: SecondRing, first_sec: int, s: int, settings: ScalerSettings) -> None:
        self.settings = settings
        self.hold = settings.panic_hold_s
        self.n = settings.window_s + self.hold
        self.lo = self.n + 1 - self.hold
        self.counts = ring.window(s - self.n, s)  # seconds s-n .. s-1
        self.cum = _cumulative(self.counts)
        self.first_known = s - self.hold + 1 - first_sec

    def cover(self, width: int) -> Floats | float:
        """The seconds of data in the ``width`` seconds before each ``g``: one number once the
        data covers every such window (``width`` seconds), an array before."""
        if self.first_known >= width:
            return float(width)
        known = np.arange(self.first_known, self.first_known + self.hold, dtype=np.float64)
        out: Floats = np.minimum(np.maximum(known, 0), width)
        return out

    def last_cover(self, width: int) -> float:
        """The seconds of data in the ``width`` seconds before ``s``."""
        return float(min(max(self.first_known + self.hold - 1, 0), width))

    def sums(self, width: int) -> Floats:
        """The sums of the ``width`` seconds before each ``g``, one row per series."""
        out: Floats = self.cum[:, self.lo :] - self.cum[:, self.lo - width : self.n + 1 - width]
        return out

    def rates(self, width: int, margin: float = DEFAULT_MARGIN, size: float = 0.0) -> Rates:
        """The rates of the ``width`` seconds before ``s``; ``size``: weighted tokens per
        arriving request (``scaler.size``), 0 for the token rates alone."""
        sums = (self.cum[:, self.n] - self.cum[:, self.n - width]).tolist()
        pw, gw = self.settings.prompt_weight, self.settings.generation_weight
        rates = _rates(sums, self.last_cover(width), pw, gw, margin)
        return replace(rates, size=size) if size > 0 else rates

    def stable_demand(self, size: float = 0.0) -> Floats:
        """The stable window's demand (``scaler.demand``; sized where ``size`` > 0 and the
        window counts arrivals, ``scaler.size``) at each ``g``, 0 where no data."""
        st = self.settings
        sums = self.sums(st.window_s)
        weighted = st.prompt_weight * sums[0:4:2] + st.generation_weight * sums[1:4:2]
        cover = self.cover(st.window_s)
        if isinstance(cover, float):  # every window covered
            rates = weighted / cover  # served (row 0) and arrived (row 1) per second
            plain = demands_of(rates[0], rates[1], st.arrival_margin)
        else:
            covered = cover >= 1
            rates = weighted / np.where(covered, cover, 1.0)
            plain = np.where(covered, demands_of(rates[0], rates[1], st.arrival_margin), 0.0)
        if not size > 0:
            return plain
        arrivals = sums[5]
        sized = sized_demands(arrivals / np.maximum(cover, 1.0), size, np.maximum(rates[0], rates[1]))
        out: Floats = np.where((arrivals > 0) & (sums[6] == 0), sized, plain)
        return out

    def panic_demand(self) -> Floats:
        """The panic window's demand at each ``g`` without its busiest second."""
        st = self.settings
        wp = st.panic_window_s
        return _trimmed_demand(
            self.counts, self.lo, self.hold, wp, self.cover(wp), st.prompt_weight, st.generation_weight
        )


def _replicas_asked(demand: Floats, target: float) -> Floats:
    out: Floats = np.ceil(demand / target - 1e-9)
    return out


@dataclass(frozen=True)
class _Triggers:
    """Which of the seconds ``g`` (``first`` .. ``first + len(hits) - 1``) triggered panic:
    the replicas the panic window asks for >= ``panicThreshold`` x the replicas running at
    ``g``, the most of the replicas reporting, those the stable window asks for, and 1."""

    first: int
    hits: npt.NDArray[np.bool_]

    @classmethod
    def of(
        cls, series: WorkloadSeries, first: int, stable: Floats, panic: Floats, settings: ScalerSettings
    ) -> _Triggers:
        asked = _replicas_asked(panic, settings.target)
        floor = np.maximum(1.0, _replicas_asked(stable, settings.target))
        threshold = settings.panic_threshold
        hits = asked >= threshold * floor
        if hits[hits.argmax()] or not threshold > 0:
            # the replicas reporting only raise the count a second is compared with: without a
            # trigger against the floor there is none against them, and they need not be read
            running = np.maximum(floor, _reporting(series, first, len(hits)))
            hits = asked >= threshold * running
        return cls(first, hits)

    def since(self) -> int | None:
        """The first second that triggered, None if none did."""
        first = int(self.hits.argmax())
        return self.first + first if self.hits[first] else None

    def last(self) -> int:
        """The last second that triggered (one did)."""
        return self.first + len(self.hits) - 1 - int(self.hits[::-1].argmax())

    def held(self, stable: Floats, panic: Floats) -> float:
        """The highest demand, stable or panic, of the seconds that triggered (one did)."""
        first = int(self.hits.argmax())
        return float(np.maximum(stable, panic)[first:][self.hits[first:]].max())


def _no_data(s: int, settings: ScalerSettings) -> Evaluation:
    zero = _rates((), 0, settings.prompt_weight, settings.generation_weight)
    reason = "no entry from any sidecar of this workload (or this model) yet"
    return Evaluation(s, 0.0, zero, zero, False, None, 0.0, settings.target, 0, False, "no-data", reason)


@dataclass
class _Answer:
    """The value an evaluation reports, the rule that set it and why."""

    value: float
    rule: str
    reason: str
    since: int | None = None
    envelope: float = 0.0

    @classmethod
    def of(
        cls,
        span: _Span,
        series: WorkloadSeries,
        s: int,
        stable: Rates,
        settings: ScalerSettings,
        size: Size | None = None,
    ) -> _Answer:
        """The stable window's demand, or panic's while a second of the hold triggered."""
        stable_demand = span.stable_demand(stable.size)
        panic_demand = span.panic_demand()
        triggers = _Triggers.of(series, s - span.hold + 1, stable_demand, panic_demand, settings)
        since = triggers.since()
        if since is None:
            reason = stable_reason(settings.window_s, stable, size)
            return cls(stable.demand, f"stable-{stable.leading}", reason)
        value = max(triggers.held(stable_demand, panic_demand), stable.demand)
        reason = (
            f"panic since second {since}: the {settings.panic_window_s}s window asked for >= "
            f"{settings.panic_threshold:g}x the replicas running (those reporting, at least the "
            f"{settings.window_s}s window's); holding the highest demand of its triggers ({value:.1f} "
            f"tokens/s) until {settings.panic_hold_s}s pass without one (last: second {triggers.last()})"
        )
        return cls(value, "panic", reason, since)

    def raise_to_envelope(
        self, ring: SecondRing, first_sec: int, s: int, stable: Rates, settings: ScalerSettings
    ) -> None:
        """At least the burst envelope (``burstWindowSeconds`` > 0)."""
        self.envelope, windows = burst_envelope(ring, first_sec, s, settings)
        if self.envelope > self.value:
            self.value = self.envelope
            self.rule = "burst-envelope"
            self.reason = (
                f"burst envelope: the {settings.burst_quantile:g} quantile of the demand of the "
                f"{windows} {settings.burst_window_s}s windows of the last "
                f"{settings.burst_lookback_s}s is {self.envelope:.1f} weighted tokens/s, above the "
                f"{settings.window_s}s window's {stable.demand:.1f}"
            )


def evaluate(
    series: WorkloadSeries, settings: ScalerSettings, now_ms: int, size: Size | None = None
) -> Evaluation:
    """The scaler's answer for the last complete second before ``now_ms`` (Redis time);
    ``size``: the arriving requests' size when ``sizeWindowSeconds`` is on (``scaler.size``)."""
    s = now_ms // 1000
    ring = series.ring(settings.model)
    first_sec = series.first_sec
    if ring is None or first_sec is None:
        return _no_data(s, settings)
    w = settings.window_s
    span = _Span(ring, first_sec, s, settings)
    stable = span.rates(w, settings.arrival_margin, 0.0 if size is None else size.tokens_per_request)
    panic = span.rates(settings.panic_window_s)
    answer = _Answer.of(span, series, s, stable, settings, size)
    if settings.burst_window_s:
        answer.raise_to_envelope(ring, first_sec, s, stable, settings)
    coverage = span.last_cover(w)
    reason = answer.reason
    if coverage < w:
        reason += f"; window covers only {coverage:.0f}s of {w}s (rates divide by the covered seconds)"
    value = answer.value if math.isfinite(answer.value) and answer.value > 0 else 0.0
    target = settings.target
    return Evaluation(
        s,
        coverage,
        stable,
        panic,
        answer.since is not None,
        answer.since,
        value,
        target,
        replicas_for(value, target),
        value > settings.activation_tokens_per_second,
        answer.rule,
        reason,
        answer.envelope,
    )
