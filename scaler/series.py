"""What the scaler has read of each workload's stream: per-second sums of the sidecars'
counters (``SecondRing``), per model and for all models together, each sidecar's last
state, and the tenants' recent counts (``WorkloadSeries``). ``scaler.window`` reads them.

An entry's counts land in the second of its interval's end, placed at the earlier of its
stamp and its stream ID's time; a sidecar's ``seq`` is applied once. ``Flushes`` is the
simulator's cheaper form of one second's sidecar records, applied as those records would be.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from scaler.forecast import MINUTE_S, MinuteCounts
from scaler.metadata import MAX_WINDOW_S
from token_scaler.record import GATEWAY, ModelCounts, Record, ServerGauges, TenantCounts, entry_id_ms

# sp, sg, ap, ag, rq, ar, na: served prompt/generation, arrived prompt/generation, requests
# ended, requests arrived, and the model rows of records that do not count arrivals (their
# ar is unknown, not 0: ``scaler.size`` sizes no window or minute that holds one)
N_SERIES = 7
# Evaluations look back a window and a panic hold (at most another window); the rest
# is margin for entries that arrive late.
HISTORY_S = 2 * MAX_WINDOW_S + 5
TENANT_WINDOW_S = 60
# One sidecar's counts of one model for one flush, ``ModelCounts``' fields in order: served
# prompt/generation, arrived prompt/generation, requests ended, the gauges in flight,
# waiting, backlog prompt/generation, then requests arrived.
FlushRow = tuple[int, int, int, int, int, int, int, int, int, int]
Counters = tuple[int, int, int, int, int, int]  # sp, sg, ap, ag, rq, ar
Gauges = tuple[int, int, int, int]

Floats = npt.NDArray[np.float64]


class SecondRing:
    """Per-second sums of ``series`` counters (the seven above) over the last ``size`` seconds.
    An entry adds a handful of numbers to plain lists (numpy's per-call cost would be most of
    the ingest) and notes the slot it wrote; ``window`` copies the slots written since the last
    read into an array mirror, so a read costs the rows that changed plus one gather."""

    def __init__(self, size: int = HISTORY_S, series: int = N_SERIES) -> None:
        self.size = size
        self.series = series
        self.values: list[list[float]] = [[0.0] * series for _ in range(size)]
        self.secs: list[int] = [-1] * size
        self.dirty: set[int] = set()  # slots written since ``window`` last synced the mirror
        self._cols: Floats = np.zeros((series, size))  # the mirror, one row per series

    def add(self, sec: int, counts: list[float] | tuple[float, ...]) -> bool:
        """Add counts to second ``sec``; False when that second has left the ring."""
        slot = sec % self.size
        held = self.secs[slot]
        if held != sec:
            if held > sec:
                return False
            self.values[slot] = [float(c) for c in counts]
            self.secs[slot] = sec
            self.dirty.add(slot)
            return True
        row = self.values[slot]
        for i, c in enumerate(counts):
            row[i] += c
        self.dirty.add(slot)
        return True

    def add_row(
        self, sec: int, sp: float, sg: float, ap: float, ag: float, rq: float, ar: float, na: float
    ) -> bool:
        """``add`` of the seven series, unrolled: the path every record of every model takes."""
        slot = sec % self.size
        held = self.secs[slot]
        if held != sec:
            if held > sec:
                return False
            self.values[slot] = [float(sp), float(sg), float(ap), float(ag), float(rq), float(ar), float(na)]
            self.secs[slot] = sec
        else:
            row = self.values[slot]
            row[0] += sp
            row[1] += sg
            row[2] += ap
            row[3] += ag
            row[4] += rq
            row[5] += ar
            row[6] += na
        self.dirty.add(slot)
        return True

    def add_one(self, sec: int, count: float) -> bool:
        """``add`` to a ring of one series."""
        slot = sec % self.size
        held = self.secs[slot]
        if held != sec:
            if held > sec:
                return False
            self.values[slot] = [float(count)]
            self.secs[slot] = sec
        else:
            self.values[slot][0] += count
        self.dirty.add(slot)
        return True

    def _sync(self) -> None:
        dirty = self.dirty
        if not dirty:
            return
        values = self.values
        lo, hi = min(dirty), max(dirty) + 1
        if hi - lo <= 2 * len(dirty):
            # written slots mostly side by side (seconds in order): copy the whole run,
            # the slots not written in between included (their mirror is the same)
            self._cols[:, lo:hi] = np.array(values[lo:hi], dtype=np.float64).T
        else:
            slots = list(dirty)
            self._cols[:, slots] = np.array([values[i] for i in slots], dtype=np.float64).T
        dirty.clear()

    def window(self, start: int, stop: int) -> Floats:
        """Counts for seconds ``[start, stop)`` as an array (series, stop - start)."""
        n = stop - start
        if n <= 0:
            return np.zeros((self.series, 0))
        self._sync()
        size, secs = self.size, self.secs
        first = start % size
        if first + n <= size:  # one run of slots: a slice, no gather
            out = self._cols[:, first : first + n].copy()
            held = secs[first : first + n]
        else:
            slots = [(first + i) % size for i in range(n)]
            out = self._cols[:, slots]
            held = [secs[i] for i in slots]
        seconds = range(start, stop)
        if held != list(seconds):  # slots that hold another second than the one asked for
            out[:, [i for i, (sec, want) in enumerate(zip(held, seconds, strict=True)) if sec != want]] = 0.0
        return out

    def rows(self, start: int, stop: int) -> list[list[float]]:
        """``window`` as plain lists, one row of the series per second (a row of zeros for a
        second the ring does not hold): the rows themselves, not copies. For a few seconds
        read once, cheaper than syncing the array mirror."""
        size, n = self.size, stop - start
        first = start % size
        if 0 <= n <= size - first:
            rows, held = self.values[first : first + n], self.secs[first : first + n]
        else:
            slots = [(first + i) % size for i in range(max(n, 0))]
            rows, held = [self.values[i] for i in slots], [self.secs[i] for i in slots]
        seconds = range(start, stop)
        if held == list(seconds):
            return rows
        zeros = [0.0] * self.series
        return [row if sec == want else zeros for row, sec, want in zip(rows, held, seconds, strict=True)]


@dataclass(slots=True)
class SidecarState:
    last_ts_ms: int
    last_seen_ms: int
    last_seq: int = -1  # the seq of the last entry applied
    entries: int = 0
    # model -> (inflight, waiting for first token, backlog prompt, backlog generation)
    gauges: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)
    server: ServerGauges | None = None  # the model server's own gauges, as last reported
    gateway: bool = False  # a gateway's entries: requests it holds, not a replica

    def note(
        self, seq: int, ts_ms: int, t_ms: int, gauges: dict[str, Gauges], server: ServerGauges | None
    ) -> None:
        """An entry of this sidecar applied: stamped ``ts_ms``, placed at ``t_ms``. The
        gauges are the newest stamp's."""
        self.last_seq = seq
        self.entries += 1
        if ts_ms >= self.last_ts_ms:
            self.last_ts_ms = ts_ms
            if t_ms > self.last_seen_ms:
                self.last_seen_ms = t_ms
            self.gauges = gauges
            self.server = server


@dataclass
class Flushes:
    """One second's records of sidecars that run one model each, in the form
    ``WorkloadSeries.add_flushes`` takes instead of ``Record`` objects (what the simulator
    hands it): every record stamped ``sec * 1000`` with a 1 s interval, role sidecar, without
    tenants or server gauges, every record counting arrivals. ``sidecars``: (name, seq,
    gauges by model: empty when the record has no model) in record order; ``totals``: per
    model, the six counters (``Counters``: ``FlushRow[:5]`` and ``FlushRow[9]``) summed over
    the records that have it. The counters are integers, so their sum is exact and the same whatever the order
    (below 2**53), as the record-by-record float sums ``add_all`` makes are."""

    sec: int
    sidecars: list[tuple[str, int, dict[str, Gauges]]] = field(default_factory=list)
    totals: dict[str, Counters] = field(default_factory=dict)


@dataclass
class WorkloadSeries:
    """Everything read so far from one workload's stream."""

    rings: dict[str | None, SecondRing] = field(default_factory=dict)
    # sidecar-seconds reported per second: a record of an interval of k seconds adds k
    presence: SecondRing = field(default_factory=lambda: SecondRing(series=1))
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

    def ring(self, model: str | None) -> SecondRing | None:
        return self.rings.get(model)

    def _ring_for(self, model: str | None) -> SecondRing:
        ring = self.rings.get(model)
        if ring is None:
            ring = self.rings[model] = SecondRing()
        return ring

    def add(self, record: Record, entry_id: bytes | str) -> bool:
        """Apply an entry; False when its sidecar's ``seq`` was applied already (see below)."""
        return self._apply(record, entry_id_ms(entry_id))

    def add_all(self, records: Iterable[Record], entry_id: bytes | str) -> int:
        """``add`` of each record in turn under one entry id (the entries of one instant);
        how many were applied."""
        id_ms = entry_id_ms(entry_id)
        apply = self._apply
        applied = 0
        for record in records:
            if apply(record, id_ms):
                applied += 1
        return applied

    def add_flushes(self, flushes: Flushes, id_ms: int) -> int:
        """``add_all`` of the records ``flushes`` stands for, under one entry id whose time part
        is ``id_ms``, leaving the series as that would (every bucket, counter and sidecar state
        the same) at the cost of one record per sidecar's state, not per bucket. A seq at or
        below its sidecar's last raises ValueError (``add_all`` would skip that record, whose
        counts are in the totals); the sidecars before it are applied by then."""
        sidecars = flushes.sidecars
        n = len(sidecars)
        if not n:
            return 0
        ts_ms = flushes.sec * 1000
        t_ms = min(ts_ms, id_ms)
        if t_ms < ts_ms:
            self.clamped += n
        sec = t_ms // 1000
        states = self.sidecars
        for name, seq, gauges in sidecars:
            state = states.get(name)
            if state is None:
                state = states[name] = SidecarState(ts_ms, t_ms)
            elif seq <= state.last_seq:
                raise ValueError(f"{name}: seq {seq} applied already (last {state.last_seq})")
            state.note(seq, ts_ms, t_ms, gauges, None)
        self._count_entries(sec, sec, n)
        t0 = t1 = t2 = t3 = t4 = t5 = 0
        for model, (sp, sg, ap, ag, rq, ar) in flushes.totals.items():
            self._ring_for(model).add_row(sec, sp, sg, ap, ag, rq, ar, 0)
            t0 += sp
            t1 += sg
            t2 += ap
            t3 += ag
            t4 += rq
            t5 += ar
        # a model's ring holds no later second than the all-models ring (both take every
        # record of the model): a record is too old exactly when the all-models ring says so
        if not self._ring_for(None).add_row(sec, t0, t1, t2, t3, t4, t5, 0):
            self.too_old += n
        self.presence.add_one(sec, n)
        return n

    def _apply(self, record: Record, id_ms: int) -> bool:
        name = record.sidecar
        state = self.sidecars.get(name)
        if state is not None and record.seq <= state.last_seq:
            # The append script stores a seq once, but only while Redis keeps the sidecar's
            # seq key: after a restart without persistence (or a failover to a replica that
            # lagged), an append whose reply was lost to the crash is stored again.
            self.duplicates += 1
            return False
        ts_ms = record.ts_ms
        t_ms = ts_ms  # where the entry lies in time: min(ts, the ms part of its stream ID)
        if id_ms < ts_ms:
            t_ms = id_ms
            self.clamped += 1
        sec = t_ms // 1000
        # Counts land in the bucket of their interval's end, so the first bucket an entry
        # speaks for is that bucket minus the whole seconds its interval spans beyond it: a
        # 1 s interval speaks for its own bucket only, and coverage equals buckets with data.
        interval_s = round(record.interval_ms / 1000)
        self._count_entries(sec - interval_s + 1 if interval_s > 1 else sec, sec, 1)
        gauges, accepted = self._add_models(sec, record.models)
        gateway = record.role == GATEWAY
        if not gateway:  # a gateway's held requests are no replica running
            self.presence.add_one(sec, interval_s if interval_s > 1 else 1)
        if not accepted:
            self.too_old += 1
        if state is None:
            state = self.sidecars[name] = SidecarState(ts_ms, t_ms, gateway=gateway)
        state.note(record.seq, ts_ms, t_ms, gauges, record.server)
        if record.tenants:
            self._log_tenants(sec, record.tenants)
        return True

    def _count_entries(self, start: int, sec: int, n: int) -> None:
        """``n`` entries placed in second ``sec`` that speak for the seconds from ``start`` on:
        the first second of data, the entries applied, and whether answers already given
        change (``past_version``)."""
        if self.first_sec is None or start < self.first_sec:
            self.first_sec = start
        self.entries += n
        if sec < self.clock_sec:
            self.past_version += n

    def _add_models(self, sec: int, models: dict[str, ModelCounts]) -> tuple[dict[str, Gauges], bool]:
        """Add one record's counts to the ring of each of its models and to the all-models ring:
        the record's gauges by model, and False when a ring no longer holds ``sec``."""
        rings = self.rings
        t0 = t1 = t2 = t3 = t4 = t5 = t6 = 0.0
        accepted = True
        gauges: dict[str, Gauges] = {}
        for model, c in models.items():
            sp, sg, ap, ag, rq, ar = (
                c.served_prompt,
                c.served_generation,
                c.arrived_prompt,
                c.arrived_generation,
                c.requests,
                c.arrived_requests,
            )
            na = 0 if c.arrivals_known else 1
            gauges[model] = (c.inflight, c.waiting, c.backlog_prompt, c.backlog_generation)
            ring = rings.get(model)
            if ring is None:
                ring = rings[model] = SecondRing()
            if not ring.add_row(sec, sp, sg, ap, ag, rq, ar, na):
                accepted = False
            t0 += sp
            t1 += sg
            t2 += ap
            t3 += ag
            t4 += rq
            t5 += ar
            t6 += na
        all_models = rings.get(None)
        if all_models is None:
            all_models = rings[None] = SecondRing()
        if not all_models.add_row(sec, t0, t1, t2, t3, t4, t5, t6):
            accepted = False
        return gauges, accepted

    def _log_tenants(self, sec: int, tenants: dict[str, dict[str, TenantCounts]]) -> None:
        log = self.tenant_log
        for tenant, per_model in tenants.items():
            for model, tc in per_model.items():
                log.append((sec, tenant, model, tc.prompt, tc.generation, tc.requests))

    def minute_counts(self, minute: int, model: str | None = None) -> MinuteCounts | None:
        """The tokens of one whole minute (Unix seconds // 60), None unless the data covers
        all of it; its arrivals None where unknown (a record that does not count them, or a
        negative sum: a gateway's take-back of a request held the minute before)."""
        ring = self.rings.get(model)
        start = minute * MINUTE_S
        if ring is None or self.first_sec is None or self.first_sec > start:
            return None
        sums = ring.window(start, start + MINUTE_S).sum(axis=1)
        arrivals = float(sums[5]) if sums[6] == 0 and sums[5] >= 0 else None
        return MinuteCounts(float(sums[0]), float(sums[1]), float(sums[2]), float(sums[3]), arrivals)

    def prune(self, now_ms: int) -> None:
        """Forget sidecars silent for longer than the history, and old tenant rows."""
        horizon = now_ms - HISTORY_S * 1000
        for sidecar in [s for s, st in self.sidecars.items() if st.last_seen_ms < horizon]:
            del self.sidecars[sidecar]
        oldest = now_ms // 1000 - TENANT_WINDOW_S
        while self.tenant_log and self.tenant_log[0][0] < oldest:
            self.tenant_log.popleft()

    def tenant_window(self, now_ms: int) -> tuple[int, dict[tuple[str, str], tuple[int, int]]]:
        """Prompt and generated tokens served per (tenant, model) over the last
        ``TENANT_WINDOW_S`` complete seconds, and how many of those seconds data covers."""
        end = now_ms // 1000
        start = end - TENANT_WINDOW_S
        covered = 0 if self.first_sec is None else min(TENANT_WINDOW_S, max(0, end - self.first_sec))
        totals: dict[tuple[str, str], tuple[int, int]] = {}
        for sec, tenant, model, prompt, gen, _rq in self.tenant_log:
            if start <= sec < end:
                p, g = totals.get((tenant, model), (0, 0))
                totals[(tenant, model)] = (p + prompt, g + gen)
        return covered, totals

    def live_sidecars(self, now_ms: int, liveness_ms: int) -> dict[str, SidecarState]:
        return {s: st for s, st in self.live_writers(now_ms, liveness_ms).items() if not st.gateway}

    def live_writers(self, now_ms: int, liveness_ms: int) -> dict[str, SidecarState]:
        """Sidecars and gateways heard from within ``liveness_ms``."""
        return {s: st for s, st in self.sidecars.items() if now_ms - st.last_seen_ms <= liveness_ms}
