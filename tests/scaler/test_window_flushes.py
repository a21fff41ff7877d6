"""``WorkloadSeries.add_flushes`` leaves the series exactly as ``add_all`` of the records it
stands for: every bucket bit for bit, every counter and sidecar state, every evaluation."""

from __future__ import annotations

from dataclasses import asdict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scaler.metadata import ScalerSettings
from scaler.series import HISTORY_S, Flushes, Gauges, SecondRing, WorkloadSeries
from scaler.window import evaluate
from token_scaler.record import GATEWAY, ModelCounts, Record, entry_id_ms

T0 = 1_800_000_000
MODEL = "m"

count = st.integers(-50, 5000)
row = st.tuples(
    count, count, count, count, st.integers(0, 9), *(st.integers(0, 40) for _ in range(4)), st.integers(-2, 9)
)
# a second: (seconds after the last, ms the entry id lies before the stamp, the pods that
# flush with their counts or None, a gateway record's arrived prompt or None)
second = st.tuples(
    st.sampled_from([1, 1, 1, 2, 7, -3, -HISTORY_S - 2]),
    st.sampled_from([0, 0, 0, 400, 1500]),
    st.lists(st.tuples(st.integers(0, 5), st.none() | row), max_size=8, unique_by=lambda f: f[0]),
    st.none() | count,
)


Row = tuple[int, int, int, int, int, int, int, int, int]
Second = tuple[int, int, list[tuple[int, Row | None]], int | None]


def ring_state(ring: SecondRing) -> tuple[list[list[str]], list[int]]:
    # repr: -0.0 and 0.0, and the types, must agree too
    return [[repr(v) for v in r] for r in ring.values], list(ring.secs)


def same(a: WorkloadSeries, b: WorkloadSeries) -> None:
    assert {k: ring_state(r) for k, r in a.rings.items()} == {k: ring_state(r) for k, r in b.rings.items()}
    assert ring_state(a.presence) == ring_state(b.presence)
    assert list(a.sidecars) == list(b.sidecars)
    assert {k: asdict(s) for k, s in a.sidecars.items()} == {k: asdict(s) for k, s in b.sidecars.items()}
    fields = ("first_sec", "entries", "past_version", "too_old", "clamped", "duplicates")
    assert [getattr(a, f) for f in fields] == [getattr(b, f) for f in fields]


@settings(max_examples=150, deadline=None)
@given(st.lists(second, min_size=1, max_size=40), st.integers(0, 3))
def test_add_flushes_is_add_all_of_the_records(seconds: list[Second], clock_lag: int) -> None:
    by_records, by_flushes = WorkloadSeries(), WorkloadSeries()
    seqs = [0] * 6
    sec, gateway_seq = T0, 0
    for step, early_ms, flushing, gateway in seconds:
        sec += step
        entry_id = f"{sec * 1000 - early_ms}-0"
        for series in (by_records, by_flushes):
            series.clock_sec = sec - clock_lag
        records: list[Record] = []
        sidecars: list[tuple[str, int, dict[str, Gauges]]] = []
        rows: list[Row] = []
        for pod, counts in flushing:
            seqs[pod] += 1
            name = f"pod-{pod}"
            models = {} if counts is None else {MODEL: ModelCounts(*counts)}
            records.append(Record(name, seqs[pod], sec * 1000, 1000, models))
            sidecars.append((name, seqs[pod], {} if counts is None else {MODEL: counts[5:9]}))
            if counts is not None:
                rows.append(counts)
        sums = [sum(r[i] for r in rows) for i in (0, 1, 2, 3, 4, 9)]
        totals = {MODEL: (sums[0], sums[1], sums[2], sums[3], sums[4], sums[5])} if rows else {}
        gateway_records: list[Record] = []
        if gateway is not None:
            gateway_seq += 1
            held = ModelCounts(0, 0, gateway, 0, 0, 1, 1, gateway, 0, 1)
            gateway_records.append(Record("gw", gateway_seq, sec * 1000, 1000, {MODEL: held}, role=GATEWAY))
        applied = by_records.add_all(records + gateway_records, entry_id)
        got = by_flushes.add_flushes(Flushes(sec, sidecars, totals), entry_id_ms(entry_id))
        got += by_flushes.add_all(gateway_records, entry_id)
        assert got == applied
        same(by_records, by_flushes)
    s = ScalerSettings("ns/llm", 130.0, panic_window_s=6, burst_window_s=5)
    for now in range(sec - 20, sec + 3, 4):
        assert evaluate(by_records, s, now * 1000) == evaluate(by_flushes, s, now * 1000)


def test_a_seq_applied_already_is_refused() -> None:
    series = WorkloadSeries()
    series.add_flushes(Flushes(T0, [("a", 1, {})]), T0 * 1000)
    with pytest.raises(ValueError, match="seq 1"):
        series.add_flushes(Flushes(T0 + 1, [("a", 1, {})]), (T0 + 1) * 1000)


def test_no_sidecar_is_no_entry() -> None:
    series = WorkloadSeries()
    assert series.add_flushes(Flushes(T0), T0 * 1000) == 0
    assert series.first_sec is None and not series.rings
