"""The in-flight floor (``inFlightPerReplica``): requests in flight at the live sidecars and
held at gateways, as a floor under the token answer, in the scaler and in the simulator."""

from __future__ import annotations

import time

import numpy as np
import pytest

from scaler.metadata import ScalerSettings
from scaler.metrics import ScalerMetrics
from scaler.pressure import apply_floor, pressure
from scaler.reader import StreamReader
from scaler.registry import Registry
from scaler.series import WorkloadSeries
from scaler.window import evaluate
from token_scaler.record import GATEWAY, ModelCounts, Record
from tuning.policies import TokenPolicy
from tuning.registry import Calibration, make, token_metadata
from tuning.trace import Trace

T0 = 1_800_000_000


def _counts(tokens: int, inflight: int) -> ModelCounts:
    return ModelCounts(0, tokens, 0, tokens, 1, inflight, 0, 0, 0)


def _series(inflight: dict[str, dict[str, int]], held: int = 0, seconds: int = 60) -> WorkloadSeries:
    """``inflight``: sidecar -> model -> requests in flight; each model serves 50 tokens/s."""
    series = WorkloadSeries()
    for k in range(seconds):
        ts = (T0 + k) * 1000 + 999
        for sidecar, models in inflight.items():
            counts = {m: _counts(50, n) for m, n in models.items()}
            series.add(Record(sidecar, k + 1, ts, 1000, counts), f"{ts}-0")
        if held:
            gateway = {"m": ModelCounts(0, 0, 0, 0, 0, held, held, 0, 0)}
            series.add(Record("gw-1", k + 1, ts, 1000, gateway, role=GATEWAY), f"{ts}-0")
    return series


NOW = (T0 + 60) * 1000


def test_floor_counts_every_sidecar_and_the_requests_held_at_gateways() -> None:
    # two sidecars with 10 requests in flight each, a gateway holding 5: 25 at 8 per replica
    # need ceil(25 / 8) = 4 replicas, while 100 tokens/s at a target of 1000 ask for 1
    series = _series({"pod-a": {"m": 10}, "pod-b": {"m": 10}}, held=5)
    s = ScalerSettings("ns/llm", tokens_per_second_per_replica=1000.0, headroom=1.0, in_flight_per_replica=8)
    base = evaluate(series, s, NOW)
    assert base.replicas == 1
    p = pressure(series.live_writers(NOW, 5000), s.model)
    assert p.in_flight == 25
    raised = apply_floor(base, p, s)
    assert (raised.rule, raised.replicas, raised.active) == ("in-flight", 4, True)
    assert raised.value == pytest.approx(4 * 1000.0)
    assert "25 requests in flight at 8 per replica need 4 replicas" in raised.reason
    assert base.reason in raised.reason
    # the sidecars alone (no gateway) hold 20: 3 replicas
    assert pressure(series.live_sidecars(NOW, 5000)).in_flight == 20


def test_floor_counts_only_the_scaled_model_and_live_writers() -> None:
    series = _series({"pod-a": {"a": 6, "b": 30}, "pod-b": {"a": 6}})
    s = ScalerSettings("ns/llm", 1000.0, headroom=1.0, model="a", in_flight_per_replica=4)
    p = pressure(series.live_writers(NOW, 5000), s.model)
    assert p.in_flight == 12
    assert apply_floor(evaluate(series, s, NOW), p, s).replicas == 3
    assert pressure(series.live_writers(NOW, 5000)).in_flight == 42  # all models
    # a writer silent for longer than the liveness bound is left out
    later = NOW + 10_000
    assert pressure(series.live_writers(later, 5000), "a").in_flight == 0


def test_no_floor_when_off_idle_or_below_the_token_answer() -> None:
    series = _series({"pod-a": {"m": 3}})
    p = pressure(series.live_writers(NOW, 5000))
    off = ScalerSettings("ns/llm", 20.0, headroom=1.0)
    base = evaluate(series, off, NOW)
    assert base.replicas == 3  # 50 tokens/s at 20 per replica
    assert apply_floor(base, p, off) == base
    # on, but 3 in flight at 2 per replica need 2: the token answer (3) stands
    on = ScalerSettings("ns/llm", 20.0, headroom=1.0, in_flight_per_replica=2)
    assert apply_floor(evaluate(series, on, NOW), p, on).rule == base.rule
    idle = _series({"pod-a": {"m": 0}})
    kept = apply_floor(evaluate(idle, on, NOW), pressure(idle.live_writers(NOW, 5000)), on)
    assert kept.rule != "in-flight"


async def test_the_scaler_answers_with_the_floor_from_held_requests() -> None:
    # a workload at zero: no sidecar, a gateway holding 3 requests; at 1 per replica the
    # scaler asks for 3 replicas and is active at once
    reader = StreamReader(client=None, metrics=ScalerMetrics())
    reader._mark_ok()
    now_ms = (int(time.time()) + 5) * 1000 + 500
    reader._offset_ms = now_ms - time.time() * 1000
    second = reader.now_ms() // 1000
    series = reader.series["ns/llm"] = WorkloadSeries()
    series.clock_sec = second
    for k in range(1, 4):
        ts = (second - 4 + k) * 1000 + 999
        held = {"m": ModelCounts(0, 0, 20 if k == 1 else 0, 0, 0, 3, 3, 0, 0)}
        series.add(Record("gw-1", k, ts, 1000, held, role=GATEWAY), f"{ts}-0")
    registry = Registry(reader, reader.metrics)
    meta = {"tokensPerSecondPerReplica": "1000", "headroom": "1", "inFlightPerReplica": "1"}
    state = registry.resolve("ns", "llm", meta, "GetMetrics")
    answer = await registry.evaluate(state)
    assert (answer.rule, answer.replicas, answer.active) == ("in-flight", 3, True)
    without = registry.resolve("ns", "other", {"tokensPerSecondPerReplica": "1000"}, "GetMetrics")
    reader.series["ns/other"] = series
    assert (await registry.evaluate(without)).replicas == 1


def _trace(n: int) -> Trace:
    arrival = np.linspace(0.0, 60.0, n, endpoint=False)
    return Trace(arrival, np.full(n, 100, dtype=np.int64), np.full(n, 100, dtype=np.int64))


def test_sweep_variant_sets_the_floor_at_the_concurrency_target() -> None:
    cal = Calibration(_trace(10), 4000.0, 1.0, 1.0, 32, {"tokensPerSecondPerReplica": "4000"}, 60)
    assert token_metadata(cal, 2.0, {"inflight": "on"})["inFlightPerReplica"] == "16"
    assert "inFlightPerReplica" not in token_metadata(cal, 2.0, {"inflight": "off"})
    assert token_metadata(cal, 0.5, {"inflight": "on"})["inFlightPerReplica"] == "64"
    policy = make("token", cal, 2.0, {"inflight": "on"})
    assert isinstance(policy, TokenPolicy) and policy.settings.in_flight_per_replica == 16


def test_simulated_token_policy_applies_the_floor_from_its_records() -> None:
    settings = ScalerSettings("default/llm", 1000.0, headroom=1.0, in_flight_per_replica=5)
    policy = TokenPolicy(settings)
    plain = TokenPolicy(ScalerSettings("default/llm", 1000.0, headroom=1.0))
    from tuning.policies import Second

    for t in range(1, 31):
        records = [Record(f"pod-{i}", t, t * 1000, 1000, {"m": _counts(100, 9)}) for i in range(2)]
        for p in (policy, plain):
            p.observe(Second(t, 2, 0.0, 200.0, records))
    # 18 in flight at 5 per replica: 4 replicas' worth, against 200 tokens/s at 1000
    assert policy.value(31.0, 0) == pytest.approx(4000.0)
    assert plain.value(31.0, 0) == pytest.approx(200.0)
