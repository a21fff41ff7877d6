"""Model names become labels only once the server answered them, or by the allow-list, and the
models ScaledObjects count are never ``other``."""

from __future__ import annotations

import asyncio

import aiohttp
import redis

from sidecar.labels import ModelLabels
from sidecar.meter import Meter
from tests.sidecar.conftest import StartSidecar, read_records
from tests.sidecar.fake_upstream import FakeUpstream
from token_scaler import model_keys
from token_scaler.record import TenantCounts


def test_labels_are_earned_allowed_or_pinned() -> None:
    labels = ModelLabels(2)
    assert labels("junk") == "other" and labels("unknown") == "unknown"
    for name in ("a", "b", "c"):
        labels.confirm(name)
    assert [labels(n) for n in ("a", "b", "c")] == ["a", "b", "other"]
    labels.pin(["c"])
    assert labels("c") == "c"
    allowed = ModelLabels(2, ["x"])
    allowed.confirm("y")
    assert (allowed("x"), allowed("y")) == ("x", "other")


async def chat(session: aiohttp.ClientSession, port: int, model: str, fail: str | None = None) -> int:
    headers = {"X-Fake-Fail": fail} if fail else {}
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    async with session.post(
        f"http://127.0.0.1:{port}/v1/chat/completions", json=body, headers=headers
    ) as response:
        await response.read()
        return response.status


async def test_refused_junk_models_take_no_slot_and_a_counted_model_is_never_other(
    start_sidecar: StartSidecar, upstream: FakeUpstream, redis_url: str, workload: str
) -> None:
    sync = redis.Redis.from_url(redis_url)
    sync.set(model_keys.models_key(workload), model_keys.encode({"llama-8b"}), px=30_000)
    sync.close()
    sidecar = await start_sidecar(max_models=4)
    for _ in range(100):  # the pinned names are read at start
        if sidecar.proxy.models("llama-8b") == "llama-8b":
            break
        await asyncio.sleep(0.02)
    async with aiohttp.ClientSession() as session:
        statuses = [await chat(session, sidecar.port, f"junk-{i}", fail="422") for i in range(40)]
        assert set(statuses) == {422}
        assert await chat(session, sidecar.port, "llama-8b") == 200
        assert await chat(session, sidecar.port, "small") == 200  # answered: a label with this request
        assert await chat(session, sidecar.port, "small") == 200
    sidecar.flusher.tick()
    assert await sidecar.flusher.deliver()
    requests: dict[str, int] = {}
    arrived: dict[str, int] = {}
    for record in read_records(redis_url, workload):
        for model, counts in record.models.items():
            requests[model] = requests.get(model, 0) + counts.requests
            arrived[model] = arrived.get(model, 0) + counts.arrived_requests
    assert requests == {"other": 40, "llama-8b": 1, "small": 2}
    assert arrived == requests  # the first "small" arrived as "other", and moved with its label
    labels = sidecar.registry.get_sample_value(
        "tokenscaler_requests_total", {"model": "llama-8b", "tenant": "none", "code": "200"}
    )
    assert labels == 1


def test_relabel_moves_an_open_request_and_what_it_counted() -> None:
    meter = Meter()
    request = meter.arrive("other", "t", 10, 20)
    meter.generated(request, 3)
    meter.relabel(request, "m")
    meter.generated(request, 2)
    meter.finish(request, 12, 6)
    snap = meter.take()
    assert "other" not in snap.models  # nothing left there: every count moved
    m = snap.models["m"]
    assert (m.served_prompt, m.served_generation, m.arrived_prompt, m.arrived_generation) == (12, 6, 12, 6)
    assert m.requests == m.arrived_requests == 1
    assert m.inflight == m.waiting == m.backlog_prompt == m.backlog_generation == 0
    assert snap.tenants == {"t": {"m": TenantCounts(12, 6, 1)}}
