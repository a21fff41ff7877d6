"""The registry: its evaluation cache (one evaluation per second, invalidated only by entries
that land in seconds already answered), idle ScaledObjects forgotten, settings it cannot serve
refused."""

from __future__ import annotations

import time
from dataclasses import replace

import pytest

from scaler.metrics import ScalerMetrics
from scaler.reader import StreamReader
from scaler.registry import Registry
from scaler.series import WorkloadSeries
from token_scaler.errors import MetadataError
from token_scaler.record import ModelCounts, Record


async def test_cache_invalidated_only_by_entries_in_answered_seconds() -> None:
    reader = StreamReader(client=None, metrics=ScalerMetrics())
    reader._mark_ok()
    # pin Redis time to the middle of a second, so the test does not straddle one
    now_ms = (int(time.time()) + 5) * 1000 + 500
    reader._offset_ms = now_ms - time.time() * 1000
    now_ms = reader.now_ms()
    second = now_ms // 1000
    series = reader.series["ns/llm"] = WorkloadSeries()
    series.clock_sec = second

    def add(sec: int, sg: int, seq: int) -> None:
        ts = sec * 1000 + 100
        series.add(Record("a", seq, ts, 1000, {"m": ModelCounts(0, sg, 0, sg, 0, 0, 0, 0, 0)}), f"{ts}-0")

    for i in range(1, 31):
        add(second - 31 + i, 100, i)
    registry = Registry(reader, reader.metrics)
    state = registry.resolve("ns", "llm", {"tokensPerSecondPerReplica": "100"}, "GetMetrics")
    first = await registry.evaluate(state)
    add(second, 5000, 40)  # the current second: not part of any answer yet
    assert await registry.evaluate(state) is first
    add(second - 2, 310, 41)  # late: lands in an answered second
    again = await registry.evaluate(state)
    assert again is not first
    assert again.value == pytest.approx(first.value + 310 / first.coverage_s)


async def test_idle_scaled_objects_and_their_streams_are_forgotten() -> None:
    reader = StreamReader(client=None, metrics=ScalerMetrics())
    reader._mark_ok()
    registry = Registry(reader, reader.metrics)
    for name in ("a", "b"):
        reader.series[f"ns/{name}"] = WorkloadSeries()
        state = registry.resolve("ns", name, {"tokensPerSecondPerReplica": "100"}, "GetMetrics")
        registry.answered(state, await registry.evaluate(state))
    registry.objects[("ns", "a")].last_asked = {"GetMetrics": time.time() - 700}
    assert registry.forget_idle(600) == [("ns", "a")]
    assert list(registry.objects) == [("ns", "b")] and list(reader.series) == ["ns/b"]
    (family,) = reader.metrics.value.collect()
    assert [sample.labels["scaledobject"] for sample in family.samples] == ["b"]


def test_saturation_of() -> None:
    from scaler.metadata import ScalerSettings
    from scaler.registry import saturation_of
    from scaler.window import Rates, evaluate

    series = WorkloadSeries()
    for i in range(30):
        ts = (1_800_000_000 + i) * 1000 + 500
        counts = ModelCounts(0, 1000, 0, 1000, 0, 0, 0, 0, 0)
        series.add(Record("a", i, ts, 1000, {"m": counts}), f"{ts}-0")
    settings = ScalerSettings("ns/llm", 100.0, headroom=1.0)
    evaluation = evaluate(series, settings, (1_800_000_000 + 30) * 1000)
    assert evaluation.replicas == 10
    assert not saturation_of(settings, evaluation).saturated  # arrivals == served, no ceiling
    capped = ScalerSettings("ns/llm", 100.0, headroom=1.0, max_replicas=10)
    signal = saturation_of(capped, evaluation)
    assert signal.saturated and signal.reason == "max-replicas" and (signal.desired, signal.max) == (10, 10)
    queueing = Rates(30, 0, 1000, 0, 1200, 0, 1000, 1200)
    signal = saturation_of(settings, replace(evaluation, stable=queueing))
    assert signal.saturated and signal.reason == "demand"


@pytest.mark.parametrize(
    ("metadata", "key"),
    [({"predictive": "true"}, "predictive"), ({"sizeWindowSeconds": "3600"}, "sizeWindowSeconds")],
)
def test_settings_that_read_the_history_are_refused_without_one(metadata: dict[str, str], key: str) -> None:
    reader = StreamReader(client=None, metrics=ScalerMetrics())
    registry = Registry(reader, reader.metrics)
    with pytest.raises(MetadataError) as refused:
        registry.resolve("ns", "llm", {"tokensPerSecondPerReplica": "100", **metadata}, "GetMetrics")
    assert refused.value.key == key and "no per-minute history" in str(refused.value)
    assert registry.objects == {}
    registry.resolve("ns", "llm", {"tokensPerSecondPerReplica": "100"}, "GetMetrics")  # the rest is served
