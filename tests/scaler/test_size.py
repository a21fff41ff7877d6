"""Demand as arriving requests times their size (``scaler.size``), against hand-computed cases."""

from __future__ import annotations

import pytest
import redis

from scaler.forecast import DAY_MIN, MINUTE_S, MinuteCounts
from scaler.history import history_key
from scaler.metadata import ScalerSettings
from scaler.series import WorkloadSeries
from scaler.size import MIN_REQUESTS, SIZED_RANGE, Size, request_size
from scaler.window import evaluate
from tests.keda import FakeSidecar
from tests.scaler.test_scaler_service import debug_view, start
from tests.scaler.test_scaler_service import history as feed_history
from token_scaler.record import ModelCounts, Record

T0 = 1_800_000_000 - 1_800_000_000 % MINUTE_S  # a whole minute, as Redis time
T0_MIN = T0 // MINUTE_S


def sized(**kw: object) -> ScalerSettings:
    base: dict[str, object] = {
        "workload": "ns/llm",
        "tokens_per_second_per_replica": 130.0,
        "size_window_s": 600,
        "panic_threshold": 1e9,  # no panic: the stable window's answer
    }
    base.update(kw)
    return ScalerSettings(**base)


def feed(
    series: WorkloadSeries, start_s: int, seconds: int, tokens: int, arrivals: int, seq0: int = 0
) -> None:
    """One entry a second: ``tokens`` generated (served and arrived alike), ``arrivals`` requests."""
    for i in range(seconds):
        ts = (start_s + i) * 1000 + 999
        counts = ModelCounts(0, tokens, 0, tokens, arrivals, 0, 0, 0, 0, arrivals)
        series.add(Record("a", seq0 + i, ts, 1000, {"m": counts}), f"{ts}-0")


def minutes(first: int, n: int, served: float, requests: float | None) -> dict[int, MinuteCounts]:
    return {m: MinuteCounts(served / 2, served / 2, 0.0, 0.0, requests) for m in range(first, first + n)}


def test_the_size_is_tokens_served_per_arriving_request_over_the_span() -> None:
    # the span ends a minute back: at minute T0_MIN, the ten minutes T0_MIN - 11 .. T0_MIN - 2
    history = minutes(T0_MIN - 11, 10, 6000.0, 20.0)  # 300 weighted tokens per request
    size = request_size(history, T0 + 30, sized())
    assert size == Size(300.0, 10, 200.0)
    weighted = request_size(history, T0 + 30, sized(prompt_weight=0.5))
    assert weighted is not None and weighted.tokens_per_request == pytest.approx(225.0)
    # the minute just ended (which the history may not hold yet) and the current one left out
    unsettled = {T0_MIN - 1: MinuteCounts(0, 1e6, 0, 0, 1), T0_MIN: MinuteCounts(0, 1e6, 0, 0, 1)}
    short = request_size({**history, **unsettled}, T0 + 30, sized(size_window_s=300))
    assert short == Size(300.0, 5, 100.0)
    # so in every second of a minute the size reads the same minutes, one minute's span too
    one = sized(size_window_s=60)
    busy = minutes(T0_MIN - 2, 1, 18000.0, 60.0)
    assert request_size(busy, T0, one) == request_size(busy, T0 + 59, one) == Size(300.0, 1, 60.0)


def test_no_size_while_off_or_too_few_arrivals_are_known() -> None:
    history = minutes(T0_MIN - 11, 10, 6000.0, 20.0)
    assert request_size(history, T0, sized(size_window_s=0)) is None
    few = minutes(T0_MIN - 11, 10, 6000.0, (MIN_REQUESTS - 1) / 10)
    assert request_size(few, T0, sized()) is None
    # minutes whose arrivals are unknown count for nothing, not for zero requests
    busy = minutes(T0_MIN - 11, 10, 18000.0, 60.0)
    unknown = {**busy, **minutes(T0_MIN - 11, 9, 1e9, None)}
    assert request_size(unknown, T0, sized()) == Size(300.0, 1, 60.0)
    assert request_size(minutes(T0_MIN - 11, 10, 0.0, 20.0), T0, sized()) is None


def test_a_minute_with_a_record_that_does_not_count_arrivals_has_them_unknown() -> None:
    """A sidecar from before ``ar`` beside one that counts: the minute's arrivals are not the
    counting sidecar's alone, so the history says it does not know them, and a window that
    holds such a record is not sized."""
    series = WorkloadSeries()
    feed(series, T0, 120, tokens=300, arrivals=2)
    old = {"m": ModelCounts(0, 300, 0, 300, 2, 0, 0, 0, 0, arrivals_known=False)}
    ts = (T0 + 70) * 1000 + 500
    series.add(Record("old", 1, ts, 1000, old), f"{ts}-0")
    assert series.minute_counts(T0_MIN, "m") == MinuteCounts(0, 18000, 0, 18000, 120)
    assert series.minute_counts(T0_MIN + 1, "m") == MinuteCounts(0, 18300, 0, 18300, None)
    assert series.minute_counts(T0_MIN + 1) == MinuteCounts(0, 18300, 0, 18300, None)
    size = Size(250.0, 10, 1000.0)
    mixed = evaluate(series, sized(), (T0 + 120) * 1000 + 500, size)
    assert mixed.rule == "stable-arrival" and mixed.value == pytest.approx(305.0)
    later = evaluate(series, sized(), (T0 + 135) * 1000 + 500, size)  # the old record left the window
    assert later.rule == "stable-sized"


def test_a_negative_minute_of_arrivals_is_unknown() -> None:
    """A gateway's take-back of a request it held the minute before."""
    series = WorkloadSeries()
    feed(series, T0, 60, tokens=0, arrivals=0)
    back = {"m": ModelCounts(0, 0, -10, -10, 0, 0, 0, 0, 0, -1)}
    ts = (T0 + 30) * 1000 + 500
    series.add(Record("gw", 1, ts, 1000, back, role="gateway"), f"{ts}-0")
    counts = series.minute_counts(T0_MIN, "m")
    assert counts is not None and counts.arrived_requests is None


def test_the_window_demand_is_its_arrivals_times_the_size() -> None:
    series = WorkloadSeries()
    # 2 requests/s of 150 tokens each, seen as 300 tokens/s; history says 250 tokens per request
    feed(series, T0, 120, tokens=300, arrivals=2)
    size = Size(250.0, 10, 1000.0)
    ev = evaluate(series, sized(), (T0 + 120) * 1000 + 500, size)
    assert ev.stable.arrived_requests == 2 and ev.stable.size == 250
    assert ev.value == pytest.approx(500.0) and ev.rule == "stable-sized"
    assert "2.00 arriving requests/s x 250.0 weighted tokens per arriving request" in ev.reason
    plain = evaluate(series, sized(), (T0 + 120) * 1000 + 500)
    assert plain.value == pytest.approx(300.0) and plain.rule == "stable-arrival"


def test_a_window_without_counted_arrivals_keeps_the_token_rate() -> None:
    series = WorkloadSeries()
    feed(series, T0, 120, tokens=300, arrivals=0)  # sidecars that do not count arrivals
    ev = evaluate(series, sized(), (T0 + 120) * 1000 + 500, Size(250.0, 10, 1000.0))
    assert ev.value == pytest.approx(300.0) and ev.rule == "stable-arrival"


def test_panic_is_measured_against_the_sized_demand() -> None:
    """Steady at 1 request/s of 100 tokens, sized at 300 tokens per request: the stable
    window asks for 3 replicas, so a panic window at 4x the token rate (4 replicas) is no
    burst against it, while against the token rate alone (2 replicas) it is."""
    series = WorkloadSeries()
    feed(series, T0, 120, tokens=100, arrivals=1)
    feed(series, T0 + 120, 6, tokens=400, arrivals=1, seq0=120)
    now = (T0 + 126) * 1000 + 500
    settings = sized(panic_threshold=2.0, headroom=1.0, tokens_per_second_per_replica=100.0)
    assert evaluate(series, settings, now).rule == "panic"
    ev = evaluate(series, settings, now, Size(300.0, 10, 600.0))
    assert ev.rule == "stable-sized" and ev.value == pytest.approx(300.0)


async def test_keda_gets_the_sized_demand_from_the_history_in_redis(redis_url: str, workload: str) -> None:
    """The last ten minutes of history: 500 weighted tokens per arriving request. Now 2
    requests/s arrive and 300 tokens/s are served: KEDA is answered 2 x 500, and the debug
    view says so; without the key, the token rate."""
    ns, name = workload.split("/")
    sync = redis.Redis.from_url(redis_url)
    sidecar = FakeSidecar(sync, workload, "pod-a")
    now_min = sidecar.now_ms() // 1000 // MINUTE_S
    for m in range(now_min - 13, now_min + 1):  # ten minutes in the span, whatever minute it is
        sync.hset(history_key(workload, m // DAY_MIN), str(m), f"0,{500 * 120},0,{500 * 120},120")
    feed_history(sidecar, 90, sg=300, ar=2)
    running = await start(redis_url, debug_token="t")
    try:
        meta = {"tokensPerSecondPerReplica": "130", "sizeWindowSeconds": "600"}
        answer = await running.keda.poll(ns, name, meta)
        assert answer.value == pytest.approx(1000.0, rel=0.05)
        evaluation = (await debug_view(running, ns, name))["evaluation"]
        assert evaluation["rule"] == "stable-sized"
        assert evaluation["stable"]["weightedTokensPerRequest"] == pytest.approx(500.0)
        assert "over the last 10 min (1200 requests)" in evaluation["reason"]
        # its history is kept (written by the scaler each minute), predictive or not
        assert workload in running.server.registry.history_workloads()
        # a second ScaledObject of the same metadata, answered from the first one's cached
        # evaluation, shows the same sized answer in its debug view
        twin = await running.keda.poll(ns, f"{name}-twin", {**meta, "workload": workload})
        assert twin.value == answer.value
        assert (await debug_view(running, ns, f"{name}-twin"))["evaluation"]["rule"] == "stable-sized"
        plain = await running.keda.poll(ns, name, {"tokensPerSecondPerReplica": "130"})
        assert plain.value == pytest.approx(300.0, rel=0.05)
    finally:
        await running.channel.close()
        await running.server.stop()
        sync.close()


def test_misreported_arrivals_move_the_answer_by_the_range_at_most() -> None:
    """300 tokens/s in the window: whatever the arrivals or the size claim, the sized demand
    stays between 300 / 4 and 300 x 4."""
    lying = WorkloadSeries()
    feed(lying, T0, 120, tokens=300, arrivals=1000)  # no token ceiling bounds ``ar``
    ev = evaluate(lying, sized(), (T0 + 120) * 1000 + 500, Size(250.0, 10, 1000.0))
    assert ev.value == pytest.approx(300.0 * SIZED_RANGE) and ev.rule == "stable-sized"
    assert "held to 1200.0: within 4x of the token rate 300.0" in ev.reason
    # a history whose arrivals were inflated makes the size small: held from below
    series = WorkloadSeries()
    feed(series, T0, 120, tokens=300, arrivals=2)
    low = evaluate(series, sized(), (T0 + 120) * 1000 + 500, Size(0.5, 10, 1e9))
    assert low.value == pytest.approx(300.0 / SIZED_RANGE)
