"""The model server's own gauges: parsed from its Prometheus text, polled by the sidecar,
carried in the records (field ``s``), and a KV-cache floor in the scaler's answer."""

from __future__ import annotations

import aiohttp
import pytest

from scaler.metadata import ScalerSettings
from scaler.pressure import apply_floor, pressure
from scaler.series import SidecarState, WorkloadSeries
from scaler.window import evaluate
from sidecar.server_gauges import STALE_S, ServerGaugePoller, parse
from tests.sidecar.conftest import read_records
from token_scaler.errors import RecordError
from token_scaler.record import ModelCounts, Record, ServerGauges, decode

VLLM = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="llama-8b"} 12.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="llama-8b"} 3.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="llama-8b"} 0.915
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{engine="0",model_name="llama-8b"} 123456.0
"""

OLD_VLLM = """\
vllm:num_requests_running{model_name="a"} 2.0
vllm:num_requests_running{model_name="b"} 3.0
vllm:num_requests_waiting{model_name="a"} 0.0
vllm:gpu_cache_usage_perc{model_name="a"} 0.25
"""

TGI = "tgi_batch_current_size 7\ntgi_queue_size 1\n"


def test_parse_finds_each_servers_gauges() -> None:
    assert parse(VLLM) == ServerGauges(12, 3, 0.915)
    assert parse(OLD_VLLM) == ServerGauges(5, 0, 0.25)  # summed over label sets
    assert parse(TGI) == ServerGauges(7, 1, None)  # TGI says nothing of its KV cache
    assert parse("process_cpu_seconds_total 3\n") == ServerGauges(None, None, None)


def test_parse_refuses_what_is_not_prometheus_text() -> None:
    with pytest.raises(ValueError):
        parse('{"error": "not found"} and more')


def test_records_carry_the_gauges_and_readers_check_them() -> None:
    record = Record("a", 1, 5000, 1000, {}, {}, ServerGauges(12, 3, 0.915))
    assert decode(record.encode()).server == ServerGauges(12, 3, 0.915)
    assert "s" not in Record("a", 1, 5000, 1000).encode()
    for bad, field in (('{"kv": 1.5}', "s.kv"), ('{"run": -1}', "s.run"), ("[1]", "s")):
        fields = {**record.encode(), "s": bad}
        with pytest.raises(RecordError) as exc:
            decode(fields)
        assert exc.value.field == field


async def test_poller_reads_the_upstream_and_forgets_stale_gauges(upstream) -> None:
    now = [100.0]
    poller = ServerGaugePoller(f"http://127.0.0.1:{upstream.port}/metrics", monotonic=lambda: now[0])
    upstream.metrics_text = VLLM
    async with aiohttp.ClientSession() as session:
        assert await poller.poll_once(session)
        assert poller.latest() == ServerGauges(12, 3, 0.915)
        now[0] += STALE_S + 0.1
        assert poller.latest() is None  # a server that stopped answering is not reported
        missing = ServerGaugePoller(f"http://127.0.0.1:{upstream.port}/nothing-here")
        assert not await missing.poll_once(session)
        assert missing.latest() is None


async def test_sidecar_records_carry_the_servers_gauges(start_sidecar, upstream, redis_url, workload) -> None:
    upstream.metrics_text = VLLM
    sidecar = await start_sidecar()
    assert sidecar.server_gauges is not None
    async with aiohttp.ClientSession() as session:
        await sidecar.server_gauges.poll_once(session)
    sidecar.flusher.tick()
    await sidecar.flusher.deliver()
    records = read_records(redis_url, workload)
    assert records and records[-1].server == ServerGauges(12, 3, 0.915)
    off = await start_sidecar(model_metrics_url="off")
    assert off.server_gauges is None


def _series_with(kv: list[float]) -> WorkloadSeries:
    series = WorkloadSeries()
    t0 = 1_800_000_000
    for i, usage in enumerate(kv):
        for k in range(60):
            ts = (t0 + k) * 1000 + 999
            counts = {"m": ModelCounts(0, 50, 0, 50, 1, 0, 0, 0, 0)}
            series.add(Record(f"pod-{i}", k, ts, 1000, counts, {}, ServerGauges(4, 0, usage)), f"{ts}-0")
    return series


def test_kv_cache_floor_raises_the_answer_above_the_token_demand() -> None:
    # Two replicas at 90 % KV-cache use serve 100 tokens/s, one replica's worth at a target of
    # 100; with kvCacheTarget 0.6 their 1.8 caches of context need ceil(1.8 / 0.6) = 3 replicas.
    series = _series_with([0.9, 0.9])
    now = (1_800_000_000 + 60) * 1000
    s = ScalerSettings("ns/llm", tokens_per_second_per_replica=130.0, kv_cache_target=0.6)
    base = evaluate(series, s, now)
    assert base.replicas == 1
    p = pressure(series.live_sidecars(now, 5000))
    assert (p.replicas, p.running) == (2, 8) and p.kv_sum == pytest.approx(1.8)
    raised = apply_floor(base, p, s)
    assert raised.rule == "kv-cache" and raised.replicas == 3
    assert raised.value == pytest.approx(3 * base.target)
    # below the target the floor stays under the demand's answer
    calm = _series_with([0.2, 0.2])
    assert apply_floor(evaluate(calm, s, now), pressure(calm.live_sidecars(now, 5000)), s).rule != "kv-cache"
    # no server reports its cache: no floor, and the reason says why
    quiet = apply_floor(base, pressure({"a": SidecarState(0, now)}), s)
    assert quiet.replicas == base.replicas and "no model server reports" in quiet.reason
