"""Predictive pre-scaling: the seasonal forecast (pure), its history in a real Redis, and the
answer KEDA gets over gRPC with ``predictive: "true"``."""

from __future__ import annotations

import math
import time

import pytest
import redis

from scaler.forecast import DAY_MIN, MINUTE_S, WEEK_MIN, MinuteCounts, forecast
from scaler.history import HistoryStore, history_key
from scaler.metadata import ScalerSettings
from scaler.predictive import combine
from scaler.series import WorkloadSeries
from scaler.window import evaluate
from tests.keda import FakeSidecar
from tests.scaler.test_scaler_service import history as feed_history
from tests.scaler.test_scaler_service import start
from token_scaler.record import ModelCounts, Record

T0_MIN = int(time.time()) // MINUTE_S - 200  # a minute index (Unix seconds // 60), recent


def daily(minute: int, scale: float = 1.0) -> MinuteCounts:
    """A day with a ramp at 08:00: 100 tokens/s at night, 1,000 in the day (generation only)."""
    of_day = minute % DAY_MIN
    rate = 1000.0 if 8 * 60 <= of_day < 20 * 60 else 100.0
    tokens = rate * scale * MINUTE_S
    return MinuteCounts(0.0, tokens, 0.0, tokens)


def days_of(n_days: int, end_min: int, scale: float = 1.0) -> dict[int, MinuteCounts]:
    return {m: daily(m, scale) for m in range(end_min - n_days * DAY_MIN, end_min)}


def test_forecast_sees_the_morning_ramp_a_lead_ahead() -> None:
    day0 = T0_MIN - T0_MIN % DAY_MIN
    now_min = day0 + 8 * 60 - 4  # 07:56, four minutes before the ramp
    history = days_of(2, now_min)
    fc = forecast(history, now_min * MINUTE_S, 300, 1.0, 1.0, 0.3)
    assert fc.season == "day" and fc.trusted
    assert fc.value == pytest.approx(1000.0)  # the ramp is inside the next 5 minutes
    assert fc.error == pytest.approx(0.0)
    # a lead that ends before the ramp sees the night
    assert forecast(history, now_min * MINUTE_S, 120, 1.0, 1.0, 0.3).value == pytest.approx(100.0)


def test_forecast_reads_each_minute_with_the_window_s_arrival_margin() -> None:
    # yesterday's day arrived at 3x what the replicas served: the arrivals by default, the
    # served rate with arrivalMargin off, as the stable window would have answered
    day0 = T0_MIN - T0_MIN % DAY_MIN
    now_min = day0 + 12 * 60
    history = {
        m: MinuteCounts(0.0, c.served_generation, 0.0, 3 * c.arrived_generation)
        for m, c in days_of(2, now_min).items()
    }
    assert forecast(history, now_min * MINUTE_S, 300, 1.0, 1.0, 1.0).value == pytest.approx(3000.0)
    off = forecast(history, now_min * MINUTE_S, 300, 1.0, 1.0, 1.0, margin=math.inf)
    assert off.value == pytest.approx(1000.0) and off.error == pytest.approx(0.0)


def test_forecast_scales_to_the_recent_level_and_prefers_the_week() -> None:
    day0 = T0_MIN - T0_MIN % DAY_MIN
    now_min = day0 + 10 * 60
    history = days_of(8, now_min - 8 * 60)  # 8 days, then today at 1.5x
    history.update({m: daily(m, 1.5) for m in range(now_min - 8 * 60, now_min)})
    fc = forecast(history, now_min * MINUTE_S, 300, 1.0, 1.0, 1.0)
    assert fc.season == "week"
    assert fc.level == pytest.approx(1.5)
    assert fc.value == pytest.approx(1500.0)


def test_a_forecast_that_keeps_missing_is_not_trusted() -> None:
    day0 = T0_MIN - T0_MIN % DAY_MIN
    now_min = day0 + 12 * 60
    history = days_of(1, now_min - DAY_MIN)
    # today the day shape is gone: a flat 150 (the level clamps at 0.5, so it misses by 3x)
    flat = MinuteCounts(0.0, 150.0 * MINUTE_S, 0.0, 150.0 * MINUTE_S)
    history.update({m: flat for m in range(now_min - DAY_MIN, now_min)})
    fc = forecast(history, now_min * MINUTE_S, 300, 1.0, 1.0, 0.3)
    assert fc.error is not None and fc.error > 0.3
    assert not fc.trusted and "not trusted" in fc.reason


def test_no_season_no_forecast() -> None:
    fc = forecast(days_of(0, T0_MIN) | {T0_MIN - 5: daily(T0_MIN - 5)}, T0_MIN * MINUTE_S, 300, 1, 1, 0.3)
    assert fc.season == "none" and fc.value == 0 and not fc.trusted


def test_minute_counts_round_trip_and_refuse_garbage() -> None:
    counts = MinuteCounts(1.0, 2.0, 3.0, 4.0)
    assert MinuteCounts.decode(counts.encode()) == counts
    for bad in ("1,2,3", "1,2,3,x", "1,2,3,-4", "1,2,3,nan", "1,2,3,x,5", "1,2,3,4,5,6"):
        with pytest.raises(ValueError):
            MinuteCounts.decode(bad)
    with_arrivals = MinuteCounts(1.0, 2.0, 3.0, 4.0, 5.0)
    assert with_arrivals.encode() == "1,2,3,4,5" and MinuteCounts.decode("1,2,3,4,5") == with_arrivals
    # a fifth value that is no count leaves the arrivals unknown and keeps the tokens
    for unknown in ("1,2,3,4,abc", "1,2,3,4,-1", "1,2,3,4,inf"):
        assert MinuteCounts.decode(unknown) == MinuteCounts(1.0, 2.0, 3.0, 4.0, None)


def test_combine_raises_the_answer_only_while_trusted() -> None:
    s = ScalerSettings("ns/llm", tokens_per_second_per_replica=130.0, predictive=True, lead_s=300)
    series = WorkloadSeries()
    t0 = T0_MIN * MINUTE_S
    for i in range(60):
        ts = (t0 + i) * 1000 + 999
        series.add(Record("a", i, ts, 1000, {"m": ModelCounts(0, 100, 0, 100, 1, 0, 0, 0, 0)}), f"{ts}-0")
    now = (t0 + 60) * 1000
    reactive = evaluate(series, s, now)
    day0 = T0_MIN - T0_MIN % DAY_MIN
    history = days_of(2, day0 + 8 * 60 - 4)
    fc = forecast(history, (day0 + 8 * 60 - 4) * MINUTE_S, 300, 1.0, 1.0, 0.3)
    raised = combine(reactive, fc, s)
    assert raised.rule == "forecast" and raised.value == pytest.approx(1000.0)
    assert raised.replicas == math.ceil(1000.0 / s.target)
    untrusted = combine(reactive, type(fc)(fc.value, fc.season, fc.level, 0.9, False, "missing"), s)
    assert untrusted.value == reactive.value and "forecast" in untrusted.reason


def test_week_and_day_seasons_are_what_they_say() -> None:
    assert WEEK_MIN == 7 * DAY_MIN == 10080


async def test_history_in_redis_survives_a_restart(redis_url: str, workload: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.from_url(redis_url)
    try:
        series = WorkloadSeries()
        t0 = T0_MIN * MINUTE_S
        for i in range(180):  # three whole minutes
            ts = (t0 + i) * 1000 + 999
            counts = {"m": ModelCounts(10, 20, 30, 40, 1, 0, 0, 0, 0, 2)}
            series.add(Record("a", i, ts, 1000, counts), f"{ts}-0")
        store = HistoryStore(client)
        await store.load(workload, t0 + 185)
        store.get(workload).written_through = T0_MIN - 1
        written = await store.update(workload, series, t0 + 185)
        assert written == 6  # minutes 0..2 (2 ended 5 s ago: settled), all models and model "m"
        raw = await client.hgetall(history_key(workload, T0_MIN // DAY_MIN))
        assert raw[str(T0_MIN).encode()] == b"600,1200,1800,2400,120"
        assert raw[f"{T0_MIN + 1}:m".encode()] == b"600,1200,1800,2400,120"
        assert await client.ttl(history_key(workload, T0_MIN // DAY_MIN)) > 8 * 86400
        # a field another writer broke is skipped and counted, the rest read back
        await client.hset(history_key(workload, T0_MIN // DAY_MIN), "oops", "1,2")
        # a field written before arrivals were kept: its arrivals are unknown, not zero
        await client.hset(history_key(workload, T0_MIN // DAY_MIN), str(T0_MIN - 1), "1,2,3,4")
        fresh = HistoryStore(client)
        loaded = await fresh.load(workload, t0 + 185)
        assert loaded.of(None)[T0_MIN] == MinuteCounts(600, 1200, 1800, 2400, 120)
        assert loaded.of(None)[T0_MIN - 1] == MinuteCounts(1, 2, 3, 4, None)
        assert set(loaded.of("m")) == {T0_MIN, T0_MIN + 1, T0_MIN + 2}
        assert loaded.bad_fields == 1
    finally:
        await client.aclose()


async def test_keda_gets_the_forecast_when_predictive(redis_url: str, workload: str) -> None:
    """Yesterday's history says the demand rises to 1,000 tokens/s in the next minutes; today
    it is 100 now: KEDA is answered the forecast, and the debug view says why."""
    import aiohttp

    ns, name = workload.split("/")
    sync = redis.Redis.from_url(redis_url)
    sidecar = FakeSidecar(sync, workload, "pod-a")
    now_s = sidecar.now_ms() // 1000
    now_min = now_s // MINUTE_S
    # yesterday: 100 until 2 minutes after this minute, 1,000 after; the last hour as today
    for m in range(now_min - DAY_MIN - 90, now_min - DAY_MIN + 10):
        rate = 1000 if m >= now_min - DAY_MIN + 2 else 100
        tokens = rate * MINUTE_S
        sync.hset(history_key(workload, m // DAY_MIN), str(m), f"0,{tokens},0,{tokens}")
    for m in range(now_min - 70, now_min):
        sync.hset(history_key(workload, m // DAY_MIN), str(m), f"0,{100 * MINUTE_S},0,{100 * MINUTE_S}")
    feed_history(sidecar, 90, sg=100)
    running = await start(redis_url, debug_token="t")
    try:
        meta = {"tokensPerSecondPerReplica": "130", "predictive": "true", "leadSeconds": "300"}
        answer = await running.keda.poll(ns, name, meta)
        assert answer.value == pytest.approx(1000.0)
        reactive = await running.keda.poll(ns, name, {**meta, "predictive": "false"})
        assert reactive.value == pytest.approx(100.0, rel=0.05)
        # the debug view shows the ScaledObject as last asked: predictively again
        await running.keda.poll(ns, name, meta)
        async with (
            aiohttp.ClientSession() as http,
            http.get(
                f"{running.http}/debug/scalers/{ns}/{name}", headers={"Authorization": "Bearer t"}
            ) as resp,
        ):
            body = await resp.json()
        assert body["forecast"]["trusted"] is True and body["forecast"]["season"] == "day"
        assert body["evaluation"]["rule"] == "forecast"
    finally:
        await running.channel.close()
        await running.server.stop()
        sync.close()


def test_a_workload_idle_at_night_is_forecast_to_wake_before_its_ramp() -> None:
    """Nights at zero (or a few stray tokens) are forecast right, so the forecast is trusted
    when it matters most: minutes before the morning ramp of a workload scaled to zero."""
    day0 = T0_MIN - T0_MIN % DAY_MIN
    now_min = day0 + 8 * 60 - 4

    def zero_nights(minute: int, stray: float) -> MinuteCounts:
        if 8 * 60 <= minute % DAY_MIN < 20 * 60:
            return daily(minute)
        # a few stray tokens on odd minutes at night, none on even ones
        tokens = stray * MINUTE_S * (minute % 2)
        return MinuteCounts(0.0, tokens, 0.0, tokens)

    idle = {m: zero_nights(m, 0.0) for m in range(now_min - 2 * DAY_MIN, now_min)}
    fc = forecast(idle, now_min * MINUTE_S, 300, 1.0, 1.0, 0.3)
    assert fc.error == 0.0 and fc.trusted and fc.value == pytest.approx(1000.0)
    # stray tokens, today on the minutes a day ago had none: against their own tiny mean the
    # forecast misses by 200 %; against one replica's target (500 tokens/s) by 1 %
    stray = {m: zero_nights(m - 1 if m >= now_min - DAY_MIN else m, 5.0) for m in idle}
    blind = forecast(stray, now_min * MINUTE_S, 300, 1.0, 1.0, 0.3)
    assert blind.error is not None and blind.error > 0.3 and not blind.trusted
    floored = forecast(stray, now_min * MINUTE_S, 300, 1.0, 1.0, 0.3, floor=500.0)
    assert floored.error == pytest.approx(5.0 / 500.0) and floored.trusted
    assert floored.value == pytest.approx(1000.0)
