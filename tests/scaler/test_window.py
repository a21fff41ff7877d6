"""The scaler's window maths against hand-computed cases (pure, no I/O)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scaler.metadata import ScalerSettings
from scaler.series import SecondRing, WorkloadSeries
from scaler.window import evaluate, replicas_for
from token_scaler.record import ModelCounts, Record

T0 = 1_800_000_000  # a whole second, as Redis time


def settings_(**kw: object) -> ScalerSettings:
    base: dict[str, object] = {"workload": "ns/llm", "tokens_per_second_per_replica": 130.0}
    base.update(kw)
    return ScalerSettings(**base)


def feed(
    series: WorkloadSeries,
    start_s: int,
    seconds: int,
    *,
    sp: int = 0,
    sg: int = 0,
    ap: int | None = None,
    ag: int | None = None,
    sidecar: str = "a",
    model: str = "m",
    seq0: int = 0,
) -> None:
    """One entry per second at ts = the end of that second minus 1 ms."""
    for i in range(seconds):
        ts = (start_s + i) * 1000 + 999
        counts = ModelCounts(sp, sg, sp if ap is None else ap, sg if ag is None else ag, 1, 0, 0, 0, 0)
        series.add(Record(sidecar, seq0 + i, ts, 1000, {model: counts}), f"{ts}-0")


def test_steady_rate_is_the_real_rate() -> None:
    series = WorkloadSeries()
    feed(series, T0, 120, sp=100, sg=200)
    ev = evaluate(series, settings_(), (T0 + 120) * 1000 + 500)
    assert ev.stable.served_prompt == 100 and ev.stable.served_generation == 200
    assert ev.value == 300 and ev.rule == "stable-arrival"
    assert ev.target == pytest.approx(100.0)  # 130 / 1.3
    assert ev.replicas == 3 and not ev.panic_active and ev.coverage_s == 60


def test_weights_apply_to_prompt_and_generation() -> None:
    series = WorkloadSeries()
    feed(series, T0, 120, sp=100, sg=200)
    ev = evaluate(series, settings_(prompt_weight=0.5, generation_weight=2.0), (T0 + 120) * 1000)
    assert ev.value == pytest.approx(0.5 * 100 + 2.0 * 200)


def test_only_complete_seconds_count_and_answers_are_stable_within_a_second() -> None:
    series = WorkloadSeries()
    feed(series, T0, 120, sp=100)
    now = (T0 + 120) * 1000
    first = evaluate(series, settings_(), now + 1)
    # an entry in the current, incomplete second changes nothing until that second ends
    series.add(
        Record("b", 0, now + 500, 1000, {"m": ModelCounts(10_000, 0, 10_000, 0, 0, 0, 0, 0, 0)}),
        f"{now + 500}-0",
    )
    assert evaluate(series, settings_(), now + 999) == first
    later = evaluate(series, settings_(), now + 1000)
    # seconds T0+61 .. T0+120: 59 fed seconds and the one with the new entry
    assert later.stable.served_prompt == pytest.approx((59 * 100 + 10_000) / 60)


def test_half_filled_window_divides_by_covered_seconds() -> None:
    series = WorkloadSeries()
    feed(series, T0, 10, sp=600)  # first data at T0 (interval start), 10 s covered
    ev = evaluate(series, settings_(), (T0 + 10) * 1000)
    assert ev.coverage_s == 10
    assert ev.value == 600  # not 600 * 10 / 60
    assert "covers only 10s of 60s" in ev.reason


def test_saturation_demand_follows_arrivals() -> None:
    # replicas serve 1,000 tokens/s in total while 3,000 tokens/s arrive
    series = WorkloadSeries()
    feed(series, T0, 120, sg=1000, ag=3000)
    ev = evaluate(series, settings_(tokens_per_second_per_replica=500.0, headroom=1.0), (T0 + 120) * 1000)
    assert ev.stable.served == 1000 and ev.stable.arrived == 3000
    assert ev.value == 3000 and ev.rule == "stable-arrival"
    assert ev.replicas == 6  # 3x the 2 replicas that serve 1,000 tokens/s


def test_arrivals_within_the_margin_leave_the_served_rate() -> None:
    # a long generation's estimate counted on arrival before its tokens stream: arrivals run
    # 8 % above what is served
    series = WorkloadSeries()
    feed(series, T0, 120, sp=500, sg=500, ag=580)
    now = (T0 + 120) * 1000
    assert evaluate(series, settings_(), now).value == 1080  # by default, the higher rate
    ev = evaluate(series, settings_(arrival_margin=0.1), now)
    assert ev.stable.arrived == 1080 and ev.value == 1000 and ev.rule == "stable-served"
    assert "(arrival rate 1080.0, within 1.1x of it)" in ev.reason


def test_arrivals_beyond_the_margin_are_the_demand() -> None:
    series = WorkloadSeries()
    feed(series, T0, 120, sp=500, sg=500, ag=620)
    ev = evaluate(series, settings_(arrival_margin=0.1), (T0 + 120) * 1000)
    assert ev.value == 1120 and ev.rule == "stable-arrival"
    assert "(over 1.1x the served rate 1000.0)" in ev.reason


def test_margin_off_keeps_the_served_rate_of_a_saturated_fleet() -> None:
    series = WorkloadSeries()
    feed(series, T0, 120, sg=1000, ag=3000)
    # (panic, which looks for bursts in the higher of the two rates, kept out of the way)
    ev = evaluate(series, settings_(arrival_margin=math.inf, panic_threshold=100.0), (T0 + 120) * 1000)
    assert ev.value == 1000 and ev.rule == "stable-served"
    assert "arrivalMargin off; arrival rate 3000.0" in ev.reason


def test_nothing_served_is_judged_on_arrivals_even_with_margin_off() -> None:
    # no replica serves yet (scale from zero, or every request still waiting for its first token)
    series = WorkloadSeries()
    feed(series, T0, 120, ap=300, ag=900)
    ev = evaluate(series, settings_(arrival_margin=math.inf), (T0 + 120) * 1000)
    assert ev.stable.served == 0 and ev.value == 1200 and ev.rule == "stable-arrival"


def test_draining_queue_keeps_the_served_rate() -> None:
    series = WorkloadSeries()
    feed(series, T0, 120, sg=800, ag=0)
    ev = evaluate(series, settings_(), (T0 + 120) * 1000)
    assert ev.value == 800 and ev.rule == "stable-served"


def test_model_filter() -> None:
    series = WorkloadSeries()
    feed(series, T0, 60, sp=100, model="big")
    feed(series, T0, 60, sp=50, model="small", sidecar="b")
    now = (T0 + 60) * 1000
    assert evaluate(series, settings_(), now).value == 150
    assert evaluate(series, settings_(model="big"), now).value == 100
    assert evaluate(series, settings_(model="other"), now).rule == "no-data"


def test_several_sidecars_add_up() -> None:
    series = WorkloadSeries()
    for i in range(5):
        feed(series, T0, 60, sg=40, sidecar=f"pod-{i}")
    assert evaluate(series, settings_(), (T0 + 60) * 1000).value == 200


def test_no_data() -> None:
    ev = evaluate(WorkloadSeries(), settings_(), T0 * 1000)
    assert ev.value == 0 and ev.replicas == 0 and not ev.active and ev.rule == "no-data"


def test_panic_entry_hold_and_exit() -> None:
    # 100 tokens/s for 120 s, then a burst of 1,000 tokens/s for 6 s, then 100 again.
    # target = 130 / 1.3 = 100 tokens/s per replica; one sidecar reports.
    series = WorkloadSeries()
    feed(series, T0, 120, sg=100)
    feed(series, T0 + 120, 6, sg=1000, seq0=120)
    feed(series, T0 + 126, 200, sg=100, seq0=126)
    s = settings_()  # panic window 6 s, threshold 2, hold 15 s

    before = evaluate(series, s, (T0 + 120) * 1000)
    assert not before.panic_active and before.value == 100

    # The panic window's demand leaves out its busiest second. Second 2 of the burst:
    # (4*100 + 2*1000 - 1000)/5 = 280 -> 3 replicas; running = max(1 reporting, stable
    # (58*100 + 2000)/60 = 130 -> 2) = 2; 3 < 2 x 2: no panic yet.
    two = evaluate(series, s, (T0 + 122) * 1000)
    assert not two.panic_active and two.value == pytest.approx(130)
    # Second 3: (3*100 + 3*1000 - 1000)/5 = 460 -> 5 replicas >= 2 x 2: panic.
    three = evaluate(series, s, (T0 + 123) * 1000)
    assert three.panic_active and three.panic_since == T0 + 123
    assert three.value == pytest.approx(460) and three.replicas == 5
    # End of the burst: the panic window is all burst.
    peak = evaluate(series, s, (T0 + 126) * 1000)
    assert peak.value == pytest.approx(1000) and peak.replicas == 10

    # The last trigger, as the scaler compares them (the stable window's replicas rule here).
    last = max(t for t in range(T0 + 121, T0 + 200) if _triggers(series, s, t))
    assert last < T0 + 132  # the burst left the 6 s window by then
    # The value holds the highest demand of the triggers within the last 15 s: 1,000
    # while the peak is inside them, then the last trigger's own, until 15 s after it...
    assert evaluate(series, s, (T0 + 126 + 14) * 1000).value == pytest.approx(1000)
    assert last + 14 > T0 + 126 + 14
    held = evaluate(series, s, (last + 14) * 1000)
    assert held.panic_active
    last_demand = evaluate(series, replace(s, panic_hold_s=1), last * 1000).value
    assert last_demand < 1000 and held.value == pytest.approx(last_demand)
    # ...and then panic ends: the burst costs 15 s past its last trigger, not a window.
    after = evaluate(series, s, (last + 15) * 1000)
    assert not after.panic_active and after.rule.startswith("stable")
    assert after.value == after.stable.demand < 200


def test_panic_compares_with_the_replicas_reporting() -> None:
    # Ten sidecars report (a fleet scaled up after an earlier burst) while the stable
    # window asks for 3: a burst to 8 replicas' worth fits the running fleet, no panic.
    series = WorkloadSeries()
    for i in range(10):
        feed(series, T0, 120, sg=30, sidecar=f"pod-{i}", seq0=0)
        feed(series, T0 + 120, 6, sg=80, sidecar=f"pod-{i}", seq0=120)
    s = settings_()
    ev = evaluate(series, s, (T0 + 126) * 1000)
    assert ev.panic.demand == pytest.approx(800) and replicas_for(ev.panic.demand, ev.target) == 8
    assert ev.stable.demand < 400  # the stable window asks for 4 at most: 8 >= 2 x 4
    assert not ev.panic_active  # but 8 < 2 x 10 replicas running
    # The same burst onto two sidecars panics.
    small = WorkloadSeries()
    for i in range(2):
        feed(small, T0, 120, sg=150, sidecar=f"pod-{i}")
        feed(small, T0 + 120, 6, sg=400, sidecar=f"pod-{i}", seq0=120)
    assert evaluate(small, s, (T0 + 126) * 1000).panic_active


def _triggers(series: WorkloadSeries, s: ScalerSettings, t: int) -> bool:
    # a hold of one second: panic at t exactly when second t triggers
    return evaluate(series, replace(s, panic_hold_s=1), t * 1000).panic_active


def test_one_long_generation_ending_does_not_panic() -> None:
    # 300 tokens/s for two minutes; then one request's generation of 3,000 tokens beyond its
    # estimate is corrected in the second it ends: one second of 3,300 arrived tokens
    series = WorkloadSeries()
    feed(series, T0, 120, sg=300)
    ts = (T0 + 120) * 1000 + 999
    series.add(Record("a", 120, ts, 1000, {"m": ModelCounts(0, 300, 0, 3300, 1, 0, 0, 0, 0)}), f"{ts}-0")
    feed(series, T0 + 121, 5, sg=300, seq0=121)
    s = settings_()
    # untrimmed, the 6 s window would ask for (5*300 + 3300)/6 = 800 -> 8 >= 2 x 4 replicas
    assert not any(evaluate(series, s, (T0 + t) * 1000).panic_active for t in range(121, 130))
    # a burst that lasts raises every second and panics
    feed(series, T0 + 126, 6, sg=1500, seq0=126)
    assert evaluate(series, s, (T0 + 132) * 1000).panic_active


def test_small_noise_does_not_panic() -> None:
    series = WorkloadSeries()
    feed(series, T0, 60, sg=1)
    feed(series, T0 + 60, 6, sg=20, seq0=60)  # 20x the rate, but still under one replica
    assert not evaluate(series, settings_(), (T0 + 66) * 1000).panic_active


def test_late_entries_land_in_the_time_they_describe() -> None:
    series = WorkloadSeries()
    feed(series, T0, 60, sg=100)
    # delivered 30 s after the fact (buffered through an outage): ts is in the past
    ts = (T0 + 20) * 1000 + 999
    series.add(
        Record("b", 0, ts, 1000, {"m": ModelCounts(0, 600, 0, 600, 0, 0, 0, 0, 0)}), f"{ts + 30_000}-0"
    )
    ev = evaluate(series, settings_(), (T0 + 60) * 1000)
    assert ev.value == pytest.approx(100 + 600 / 60)
    assert series.clamped == 0


def test_clock_ahead_is_clamped_to_the_stream_id() -> None:
    series = WorkloadSeries()
    ts_ahead = (T0 + 30) * 1000
    stored = T0 * 1000 + 999
    series.add(
        Record("a", 0, ts_ahead, 1000, {"m": ModelCounts(0, 500, 0, 500, 0, 0, 0, 0, 0)}), f"{stored}-0"
    )
    assert series.clamped == 1
    ev = evaluate(series, settings_(), (T0 + 1) * 1000)
    assert ev.value == 500  # counted in second T0, where Redis stored it


def test_ring_rejects_seconds_it_no_longer_holds() -> None:
    ring = SecondRing(size=10)
    assert ring.add(100, [1, 0, 0, 0, 0, 0, 0])
    assert ring.add(110, [2, 0, 0, 0, 0, 0, 0])  # reuses slot 0
    assert not ring.add(100, [5, 0, 0, 0, 0, 0, 0])
    window = ring.window(100, 111)
    assert window[0].tolist() == [0.0] * 10 + [2.0]


def test_ring_rows_are_the_window_as_lists() -> None:
    ring = SecondRing(size=10)
    for sec in (103, 104, 105, 108, 111, 112):  # 111 and 112 wrap round into slots 1 and 2
        assert ring.add(sec, [sec, 1, 2, 3, 4, 5, 0])
    for start, stop in ((103, 106), (100, 113), (104, 114), (108, 108), (95, 99)):
        assert ring.rows(start, stop) == ring.window(start, stop).T.tolist(), (start, stop)


def test_gauges_follow_the_newest_entry_per_sidecar() -> None:
    series = WorkloadSeries()
    new = Record("a", 2, T0 * 1000 + 2000, 1000, {"m": ModelCounts(0, 0, 0, 0, 0, 3, 1, 50, 70)})
    # a later seq with an older ts (stamped late: cut before the sidecar knew Redis' clock)
    old = Record("a", 3, T0 * 1000 + 1000, 1000, {"m": ModelCounts(0, 0, 0, 0, 0, 9, 9, 9, 9)})
    series.add(new, f"{T0 * 1000 + 2000}-0")
    series.add(old, f"{T0 * 1000 + 5000}-0")  # arrives late: must not replace the newer gauges
    assert series.sidecars["a"].gauges["m"] == (3, 1, 50, 70)
    assert list(series.live_sidecars(T0 * 1000 + 6000, 5000)) == ["a"]
    assert series.live_sidecars(T0 * 1000 + 20_000, 5000) == {}


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 5000), st.integers(0, 5000), st.integers(0, 5000), st.integers(0, 5000)),
        min_size=1,
        max_size=150,
    ),
    st.integers(10, 120),
    st.floats(0, 5),
    st.floats(0, 5),
)
def test_value_is_never_negative_nan_or_inf_and_bounded(rows, window, pw, gw) -> None:
    if pw == 0 and gw == 0:
        pw = 1.0
    series = WorkloadSeries()
    for i, (sp, sg, ap, ag) in enumerate(rows):
        ts = (T0 + i) * 1000 + 500
        series.add(Record("a", i, ts, 1000, {"m": ModelCounts(sp, sg, ap, ag, 0, 0, 0, 0, 0)}), f"{ts}-0")
    s = settings_(window_s=window, panic_window_s=min(6, window // 2), prompt_weight=pw, generation_weight=gw)
    ev = evaluate(series, s, (T0 + len(rows)) * 1000)
    assert ev.value >= 0 and ev.value == ev.value and ev.value != float("inf")
    # nothing exceeds the highest one-second weighted rate
    peak = max(max(pw * sp + gw * sg, pw * ap + gw * ag) for sp, sg, ap, ag in rows)
    assert ev.value <= peak + 1e-6


@pytest.mark.parametrize("phase_ms", [0, 100, 499, 500, 900, 999])
@pytest.mark.parametrize("seconds", [5, 30, 90])
def test_steady_rate_is_exact_whatever_the_flush_phase(phase_ms: int, seconds: int) -> None:
    # a sidecar that started `seconds` ago and flushes every second at `phase_ms` into the second
    series = WorkloadSeries()
    for k in range(seconds):
        ts = (T0 + k) * 1000 + phase_ms
        series.add(Record("a", k, ts, 1000, {"m": ModelCounts(0, 400, 0, 400, 0, 0, 0, 0, 0)}), f"{ts}-0")
    for now_ms in ((T0 + seconds) * 1000 + phase_ms, (T0 + seconds) * 1000 + 999):
        assert evaluate(series, settings_(), now_ms).value == 400


def test_a_seq_applied_already_is_skipped() -> None:
    series = WorkloadSeries()
    first = Record("a", 7, T0 * 1000 + 999, 1000, {"m": ModelCounts(0, 500, 0, 500, 0, 0, 0, 0, 0)})
    assert series.add(first, f"{T0 * 1000 + 999}-0")
    # stored again by a Redis that forgot the seq keys, and an older seq: both skipped
    assert not series.add(first, f"{T0 * 1000 + 1500}-0")
    assert not series.add(replace(first, seq=6), f"{T0 * 1000 + 1600}-0")
    assert series.add(replace(first, sidecar="b"), f"{T0 * 1000 + 1700}-0")  # another sidecar's
    assert series.add(replace(first, seq=8), f"{T0 * 1000 + 1800}-0")
    assert (series.entries, series.duplicates, series.sidecars["a"].entries) == (3, 2, 2)
    assert evaluate(series, settings_(), (T0 + 2) * 1000).value == pytest.approx(1500 / 2)


def test_burst_envelope_is_the_quantile_of_the_burst_windows() -> None:
    """600 s of 100 tokens/s with a 10 s burst of 1,000 tokens/s every minute: the 60 s window
    sees the mean, the envelope the bursts."""
    series = WorkloadSeries()
    seq = 0
    for minute in range(10):
        start = T0 + 60 * minute
        feed(series, start, 50, sp=100, seq0=seq)
        feed(series, start + 50, 10, sp=1000, seq0=seq + 50)
        seq += 60
    now = (T0 + 600) * 1000
    off = evaluate(series, settings_(panic_threshold=1e9), now)
    assert off.rule.startswith("stable") and off.envelope == 0.0
    # windows of 10 s ending in the last 600 s: 591; ten hold a whole burst and read 1,000,
    # 90 hold part of one and read between 100 and 1,000: the top 1 % are whole bursts
    q = settings_(panic_threshold=1e9, burst_window_s=10, burst_quantile=0.99, burst_lookback_s=600)
    ev = evaluate(series, q, now)
    assert ev.rule == "burst-envelope" and ev.value == ev.envelope
    assert ev.envelope == pytest.approx(1000.0)
    assert ev.stable.demand == pytest.approx(250.0)  # (50 * 100 + 10 * 1000) / 60
    # the median 10 s window holds no burst second: the envelope is the base rate, below the
    # 60 s mean, which then answers
    median = evaluate(series, replace(q, burst_quantile=0.5), now)
    assert median.envelope == pytest.approx(100.0)
    assert median.rule.startswith("stable") and median.value == pytest.approx(250.0)
    assert "burst envelope" in ev.reason and "591 10s windows" in ev.reason


def test_burst_envelope_follows_bursts_down_after_the_lookback() -> None:
    series = WorkloadSeries()
    feed(series, T0, 10, sp=5000)
    feed(series, T0 + 10, 300, sp=100, seq0=10)
    q = settings_(panic_threshold=1e9, burst_window_s=10, burst_quantile=1.0, burst_lookback_s=120)
    # the burst's windows have left the 120 s lookback: the envelope is the base rate again
    assert evaluate(series, q, (T0 + 310) * 1000).envelope == pytest.approx(100.0)
    # within it, the highest window is the burst
    assert evaluate(series, replace(q, burst_lookback_s=600), (T0 + 310) * 1000).envelope == pytest.approx(
        5000.0
    )


def test_burst_envelope_reads_only_the_data_and_whole_windows() -> None:
    series = WorkloadSeries()
    q = settings_(burst_window_s=10, burst_quantile=1.0)
    feed(series, T0, 5, sp=100)
    # 5 s of data: no whole 10 s window yet
    assert evaluate(series, q, (T0 + 5) * 1000).envelope == 0.0
    feed(series, T0 + 5, 5, sp=100, seq0=5)
    ev = evaluate(series, q, (T0 + 10) * 1000)
    assert ev.envelope == pytest.approx(100.0)  # one window, not diluted by seconds before the data
    assert ev.rule.startswith("stable")  # an envelope only equal to the window's demand


def test_burst_metadata_is_parsed_and_checked() -> None:
    from scaler.metadata import parse
    from token_scaler.errors import MetadataError

    base = {"tokensPerSecondPerReplica": "100"}
    s = parse(
        {**base, "burstWindowSeconds": "10", "burstQuantile": "0.95", "burstLookbackSeconds": "900"},
        "ns",
        "x",
    )
    assert (s.burst_window_s, s.burst_quantile, s.burst_lookback_s) == (10, 0.95, 900)
    assert parse(base, "ns", "x").burst_window_s == 0
    for key, bad in [
        ("burstWindowSeconds", "61"),
        ("burstWindowSeconds", "ten"),
        ("burstQuantile", "0"),
        ("burstQuantile", "1.5"),
        ("burstLookbackSeconds", "1201"),
        ("burstLookbackSeconds", "30"),
    ]:
        with pytest.raises(MetadataError) as err:
            parse({**base, key: bad}, "ns", "x")
        assert key in str(err.value) and bad in str(err.value)
