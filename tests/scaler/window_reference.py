"""The scaler's window maths as it was before ingest and evaluate were made cheaper:
the reference the property test in ``test_window_equivalence`` compares against.
Plain lists per second, arrays rebuilt at every read."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from scaler.demand import DEFAULT_MARGIN, demands_of
from scaler.metadata import ScalerSettings
from scaler.series import HISTORY_S, N_SERIES, SidecarState
from scaler.size import SIZED_RANGE, Size
from scaler.window import PRESENCE_S, Evaluation, Rates, replicas_for, stable_reason
from token_scaler.record import GATEWAY, Record, entry_time_ms

Floats = npt.NDArray[np.float64]


class RefRing:
    """Per-second sums of ``series`` counters (the seven above) over the last ``size`` seconds.
    Plain lists, not arrays: an entry adds a handful of numbers, where numpy's per-call
    cost would be most of the ingest; ``window`` builds the array evaluations read."""

    def __init__(self, size: int = HISTORY_S, series: int = N_SERIES) -> None:
        self.size = size
        self.series = series
        self.values: list[list[float]] = [[0.0] * series for _ in range(size)]
        self.secs: list[int] = [-1] * size

    def add(self, sec: int, counts: list[float]) -> bool:
        """Add counts to second ``sec``; False when that second has left the ring."""
        slot = sec % self.size
        held = self.secs[slot]
        if held != sec:
            if held > sec:
                return False
            self.values[slot] = [float(c) for c in counts]
            self.secs[slot] = sec
            return True
        row = self.values[slot]
        for i, c in enumerate(counts):
            row[i] += c
        return True

    def window(self, start: int, stop: int) -> Floats:
        """Counts for seconds ``[start, stop)`` as an array (series, stop - start)."""
        zero = [0.0] * self.series
        size, secs, values = self.size, self.secs, self.values
        rows = [values[sec % size] if secs[sec % size] == sec else zero for sec in range(start, stop)]
        if not rows:
            return np.zeros((self.series, 0))
        return np.array(rows, dtype=np.float64).T.copy()


@dataclass
class RefSeries:
    """Everything read so far from one workload's stream."""

    rings: dict[str | None, RefRing] = field(default_factory=dict)
    # sidecar-seconds reported per second: a record of an interval of k seconds adds k
    presence: RefRing = field(default_factory=lambda: RefRing(series=1))
    first_sec: int | None = None
    sidecars: dict[str, SidecarState] = field(default_factory=dict)
    entries: int = 0
    # Bumped when an entry lands in a second before ``clock_sec`` (set by the reader to
    # the current Redis second): only such entries change answers already given, so
    # cached evaluations stay valid while entries fill the current second.
    past_version: int = 0
    clock_sec: int = 0
    too_old: int = 0
    clamped: int = 0
    duplicates: int = 0  # entries skipped: their sidecar's seq was applied already
    # (second, tenant, model, prompt, generation, requests), newest last
    tenant_log: deque[tuple[int, str, str, int, int, int]] = field(default_factory=deque)

    def ring(self, model: str | None) -> RefRing | None:
        return self.rings.get(model)

    def add(self, record: Record, entry_id: bytes | str) -> bool:
        """Apply an entry; False when its sidecar's ``seq`` was applied already (see below)."""
        state = self.sidecars.get(record.sidecar)
        if state is not None and record.seq <= state.last_seq:
            # The append script stores a seq once, but only while Redis keeps the sidecar's
            # seq key: after a restart without persistence (or a failover to a replica that
            # lagged), an append whose reply was lost to the crash is stored again.
            self.duplicates += 1
            return False
        t_ms = entry_time_ms(record, entry_id)
        if t_ms < record.ts_ms:
            self.clamped += 1
        sec = t_ms // 1000
        # Counts land in the bucket of their interval's end, so the first bucket an entry
        # speaks for is that bucket minus the whole seconds its interval spans beyond it: a
        # 1 s interval speaks for its own bucket only, and coverage equals buckets with data.
        start = sec - max(0, round(record.interval_ms / 1000) - 1)
        if self.first_sec is None or start < self.first_sec:
            self.first_sec = start
        self.entries += 1
        if sec < self.clock_sec:
            self.past_version += 1
        total = [0.0] * N_SERIES
        accepted = True
        for model, c in record.models.items():
            counts: list[float] = [
                c.served_prompt,
                c.served_generation,
                c.arrived_prompt,
                c.arrived_generation,
                c.requests,
                c.arrived_requests,
                0 if c.arrivals_known else 1,
            ]
            ring = self.rings.get(model)
            if ring is None:
                ring = self.rings[model] = RefRing()
            accepted = ring.add(sec, counts) and accepted
            for i in range(N_SERIES):
                total[i] += counts[i]
        all_models = self.rings.get(None)
        if all_models is None:
            all_models = self.rings[None] = RefRing()
        accepted = all_models.add(sec, total) and accepted
        if record.role != GATEWAY:  # a gateway's held requests are no replica running
            self.presence.add(sec, [max(1, round(record.interval_ms / 1000))])
        if not accepted:
            self.too_old += 1
        if state is None:
            state = self.sidecars[record.sidecar] = SidecarState(
                record.ts_ms, t_ms, gateway=record.role == GATEWAY
            )
        state.last_seq = record.seq
        state.entries += 1
        if record.ts_ms >= state.last_ts_ms:
            state.last_ts_ms = record.ts_ms
            state.last_seen_ms = max(state.last_seen_ms, t_ms)
            state.gauges = {
                m: (c.inflight, c.waiting, c.backlog_prompt, c.backlog_generation)
                for m, c in record.models.items()
            }
            state.server = record.server
        for tenant, per_model in record.tenants.items():
            for model, tc in per_model.items():
                self.tenant_log.append((sec, tenant, model, tc.prompt, tc.generation, tc.requests))
        return True


def _rates(
    sums: Floats, seconds: float, pw: float, gw: float, margin: float = DEFAULT_MARGIN, size: float = 0.0
) -> Rates:
    if seconds < 1:
        return Rates(0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, margin, 0.0, 0.0, size)
    sp, sg, ap, ag, rq, ar, na = (float(x) / seconds for x in sums)
    return Rates(seconds, sp, sg, ap, ag, rq, pw * sp + gw * sg, pw * ap + gw * ag, margin, ar, na, size)


def _reporting(series: RefSeries, grid: npt.NDArray[np.int64]) -> Floats:
    """The replicas reporting at each second of ``grid``: sidecar-seconds per second over
    the ``PRESENCE_S`` seconds before it (fewer at the start of the data)."""
    start = int(grid[0]) - PRESENCE_S
    counts = series.presence.window(start, int(grid[-1]))[0]
    cum = np.concatenate([[0.0], np.cumsum(counts)])
    ends = grid - start
    known = np.clip(grid - (series.first_sec or 0), 1, PRESENCE_S).astype(np.float64)
    out: Floats = (cum[ends] - cum[ends - known.astype(np.int64)]) / known
    return out


def _trimmed_demand(
    counts: Floats, ends: npt.NDArray[np.int64], wp: int, cover: Floats, pw: float, gw: float
) -> Floats:
    """The panic window's demand without its busiest second, for each window ending (exclusive)
    at index ``ends`` of ``counts``. A request's arrival estimate is corrected to its usage in
    the second it ends, so one long generation puts a spike in a single second; a burst of
    requests raises every second of the window, and survives the trim."""
    served = pw * counts[0] + gw * counts[1]
    arrived = pw * counts[2] + gw * counts[3]
    out = np.zeros(len(ends))
    for series in (served, arrived):
        cum = np.concatenate([[0.0], np.cumsum(series)])
        sums = cum[ends] - cum[ends - wp]
        busiest = np.lib.stride_tricks.sliding_window_view(series, wp).max(axis=1)[ends - wp]
        kept = np.maximum(cover - 1, 1.0)
        whole = sums / np.maximum(cover, 1.0)
        trimmed = np.where(cover >= 2, (sums - np.maximum(busiest, 0.0)) / kept, whole)
        out = np.maximum(out, np.where(cover >= 1, trimmed, 0.0))
    return out


def burst_envelope(ring: RefRing, first_sec: int, s: int, settings: ScalerSettings) -> tuple[float, int]:
    """The ``burstQuantile`` of the demand of the ``burstWindowSeconds`` windows ending by
    second ``s`` (exclusive) within the lookback and the data, and how many windows that is
    (0: none yet, the envelope is 0)."""
    b = settings.burst_window_s
    start = max(first_sec, s - settings.burst_lookback_s)
    if b <= 0 or s - start < b:
        return 0.0, 0
    counts = ring.window(start, s)
    pw, gw = settings.prompt_weight, settings.generation_weight
    demand = np.zeros(s - start - b + 1)
    for per_second in (pw * counts[0] + gw * counts[1], pw * counts[2] + gw * counts[3]):
        cum = np.concatenate([[0.0], np.cumsum(per_second)])
        demand = np.maximum(demand, (cum[b:] - cum[:-b]) / b)
    return float(np.quantile(demand, settings.burst_quantile)), len(demand)


def ref_evaluate(
    series: RefSeries, settings: ScalerSettings, now_ms: int, size: Size | None = None
) -> Evaluation:
    """The scaler's answer for the last complete second before ``now_ms`` (Redis time)."""
    s = now_ms // 1000
    w, wp = settings.window_s, settings.panic_window_s
    pw, gw = settings.prompt_weight, settings.generation_weight
    target = settings.target
    ring = series.ring(settings.model)
    if ring is None or series.first_sec is None:
        zero = _rates(np.zeros(N_SERIES), 0, pw, gw)
        return Evaluation(
            s,
            0.0,
            zero,
            zero,
            False,
            None,
            0.0,
            target,
            0,
            False,
            "no-data",
            "no entry from any sidecar of this workload (or this model) yet",
        )

    hold = settings.panic_hold_s
    n = w + hold
    counts = ring.window(s - n, s)  # seconds s-n .. s-1
    cum = np.zeros((N_SERIES, n + 1))
    np.cumsum(counts, axis=1, out=cum[:, 1:])
    # the seconds g = s-hold+1 .. s that may hold panic, each the end (exclusive) of its
    # windows; k indexes cum
    k = np.arange(n + 1 - hold, n + 1)
    grid = np.arange(s - hold + 1, s + 1)
    known = (grid - series.first_sec).astype(np.float64)
    stable_sums = cum[:, k] - cum[:, k - w]
    panic_sums = cum[:, k] - cum[:, k - wp]
    cover_stable = np.clip(known, 0, w)
    cover_panic = np.clip(known, 0, wp)

    per_request = 0.0 if size is None else size.tokens_per_request

    def demand(sums: Floats, cover: Floats) -> Floats:
        safe = np.where(cover >= 1, cover, 1.0)
        served = (pw * sums[0] + gw * sums[1]) / safe
        arrived = (pw * sums[2] + gw * sums[3]) / safe
        out: Floats = np.where(cover >= 1, demands_of(served, arrived, settings.arrival_margin), 0.0)
        if per_request > 0:  # sized wherever the window counts arrivals, within a range of the rate
            rate = np.maximum(np.maximum(served, arrived), 0.0)
            sized = np.clip(sums[5] / safe * per_request, rate / SIZED_RANGE, rate * SIZED_RANGE)
            out = np.where((sums[5] > 0) & (sums[6] == 0), sized, out)
        return out

    stable_demand = demand(stable_sums, cover_stable)
    panic_demand = _trimmed_demand(counts, k, wp, cover_panic, pw, gw)
    stable_replicas = np.ceil(stable_demand / target - 1e-9)
    panic_replicas = np.ceil(panic_demand / target - 1e-9)
    running = np.maximum(np.maximum(1.0, stable_replicas), _reporting(series, grid))
    triggers = panic_replicas >= settings.panic_threshold * running

    stable = _rates(stable_sums[:, -1], float(cover_stable[-1]), pw, gw, settings.arrival_margin, per_request)
    panic = _rates(panic_sums[:, -1], float(cover_panic[-1]), pw, gw)
    coverage = float(cover_stable[-1])
    which = "sized" if stable.sized else "arrival" if stable.arrivals_lead else "served"

    if triggers.any():
        first = int(np.argmax(triggers))
        held = np.maximum(stable_demand, panic_demand)[first:][triggers[first:]]
        value = max(float(held.max()), stable.demand)
        since = int(grid[first])
        last = int(grid[len(triggers) - 1 - int(np.argmax(triggers[::-1]))])
        rule = "panic"
        reason = (
            f"panic since second {since}: the {wp}s window asked for >= {settings.panic_threshold:g}x "
            f"the replicas running (those reporting, at least the {w}s window's); holding the highest "
            f"demand of its triggers ({value:.1f} tokens/s) until {hold}s pass without one "
            f"(last: second {last})"
        )
    else:
        value = stable.demand
        since = None
        rule = f"stable-{which}"
        reason = stable_reason(w, stable, size)
    envelope = 0.0
    if settings.burst_window_s:
        envelope, windows = burst_envelope(ring, series.first_sec, s, settings)
        if envelope > value:
            value = envelope
            rule = "burst-envelope"
            reason = (
                f"burst envelope: the {settings.burst_quantile:g} quantile of the demand of the "
                f"{windows} {settings.burst_window_s}s windows of the last "
                f"{settings.burst_lookback_s}s is {envelope:.1f} weighted tokens/s, above the "
                f"{w}s window's {stable.demand:.1f}"
            )
    if coverage < w:
        reason += f"; window covers only {coverage:.0f}s of {w}s (rates divide by the covered seconds)"
    value = value if math.isfinite(value) and value > 0 else 0.0
    active = value > settings.activation_tokens_per_second
    return Evaluation(
        s,
        coverage,
        stable,
        panic,
        since is not None,
        since,
        value,
        target,
        replicas_for(value, target),
        active,
        rule,
        reason,
        envelope,
    )
