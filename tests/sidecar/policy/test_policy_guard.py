"""The spend guard and the busy trigger through real sidecars, a real Redis and the openai SDK.

Time is the policies' ``Clock``: the spend guard's hour rolls over when the test moves the
wall clock an hour on (its tenants have no budget, so no admission reply brings Redis' clock
back), and the busy trigger's hysteresis runs on a monotonic clock the test sets.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest
import redis

from sidecar.policy import spend
from sidecar.policy.clock import Clock
from sidecar.policy.store import spend_keys
from sidecar.server import Sidecar
from tests.conftest import delete_keys
from tests.sidecar.conftest import StartSidecar, scope
from tests.sidecar.fake_upstream import FakeUpstream, prompt_tokens_of
from tests.sidecar.policy.test_policy_proxy import MESSAGES, sample, sdk, write_policy
from token_scaler.record import KEY_PREFIX
from token_scaler.redis_conn import LocalRedis

SIDECARS = 4
MAX_TOKENS = 100
PRICES = {"big": (1_000_000, 2_000_000), "small": (1_000_000, 1_000_000)}  # billionths per 1k tokens
PER_HOUR = 0.01  # 10,000,000 billionths
PER_HOUR_NANO = 10_000_000


def cost(model: str, prompt: int, generation: int) -> int:
    p, g = PRICES[model]
    return -(-(prompt * p + generation * g) // 1000)


class MovableClock:
    """The policies' clocks, the wall clock moved by ``shift`` seconds (after the sidecars read
    Redis' clock, a move moves theirs: no admission reply comes to set it back)."""

    def __init__(self) -> None:
        # A minute back when the real hour ends within a minute: a test's hour does not end under it.
        self.base = -60.0 if time.time() % 3600 > 3540 else 0.0
        self.shift = 0.0
        self.clock = Clock(wall=lambda: time.time() + self.shift)

    async def synced(self, sidecars: list[Sidecar]) -> None:
        """Once every sidecar read Redis' clock: moved to ``base``."""
        for side in sidecars:
            assert side.policy is not None
            for _ in range(400):
                if side.policy.redis_clock.synced:
                    break
                await asyncio.sleep(0.005)
            assert side.policy.redis_clock.synced
        self.shift = self.base


async def synced(sidecars: list[Sidecar]) -> None:
    """Every sidecar sends the spend it added, then every one reads the total back."""
    for side in sidecars:
        assert side.policy is not None
        await _settled(side)
        assert await side.policy.spend.sync()
    for side in sidecars:
        assert side.policy is not None
        await side.policy.spend.sync()


async def _settled(side: Sidecar) -> None:
    """Until no request is in flight: the last one's usage was added (right after its count)."""
    for _ in range(400):
        inflight = sum(
            s.value
            for metric in side.registry.collect()
            if metric.name == "tokenscaler_inflight_requests"
            for s in metric.samples
        )
        if inflight == 0:
            return
        await asyncio.sleep(0.005)
    raise AssertionError("a request never ended")


def in_force(side: Sidecar, workload: str, action: str, model: str = "") -> float:
    """``tokenscaler_policy_action_in_force`` of an action at a sidecar."""
    return sample(
        side, "tokenscaler_policy_action_in_force", action=action, scope=scope(workload), model=model
    )


def hour_total(redis_url: str, scope_name: str, hour: str) -> int:
    client = redis.Redis.from_url(redis_url)
    try:
        return int(client.get(f"{KEY_PREFIX}:{{policy:{scope_name}/spend}}:h:{hour}") or 0)
    finally:
        client.close()


async def ask(side: Sidecar, tenant: str, model: str = "big") -> tuple[int, str, str | None]:
    """(status, the model that served it, the downgrade header) of one request by the SDK."""
    client = sdk(side, tenant)
    try:
        raw = await client.chat.completions.with_raw_response.create(
            model=model, messages=MESSAGES, max_tokens=MAX_TOKENS
        )
    except openai.RateLimitError as exc:
        assert exc.code == "spend_limit_reached", exc
        return 429, "", None
    finally:
        await client.close()
    served = raw.parse().model
    return 200, served, raw.headers.get("x-tokenscaler-model")


@pytest.fixture
async def guarded(
    start_sidecar: StartSidecar, policy_file: Path, workload: str, redis_url: str
) -> AsyncIterator[tuple[list[Sidecar], MovableClock]]:
    write_policy(
        policy_file,
        {
            "scope": scope(workload),
            "prices": {"big": {"prompt": 0.001, "generation": 0.002}, "small": 0.001},
            "downgrade": {"big": {"to": "small"}},
            "spendGuard": {"perHour": PER_HOUR, "atSpendRatio": 0.8},
            "tenants": {"vip": {"keepModel": True}},
        },
    )
    movable = MovableClock()
    sidecars = [await start_sidecar(policy=policy_file, policy_clock=movable.clock) for _ in range(SIDECARS)]
    await movable.synced(sidecars)
    yield sidecars, movable
    delete_keys(redis_url, f"{KEY_PREFIX}:{{policy:{scope(workload)}/spend}}:*")


async def test_spend_guard_across_four_sidecars_flips_at_the_threshold_and_recovers_next_hour(
    guarded: tuple[list[Sidecar], MovableClock], upstream: FakeUpstream, workload: str, redis_url: str
) -> None:
    sidecars, movable = guarded
    prompt = prompt_tokens_of({"messages": MESSAGES})
    big, small = cost("big", prompt, MAX_TOKENS), cost("small", prompt, MAX_TOKENS)
    assert sidecars[0].policy is not None
    hour = spend.hour_of(sidecars[0].policy.redis_clock.now())
    expected = 0  # what the scope spent, by the test's own arithmetic
    outcomes: list[tuple[int, str]] = []
    for i in range(80):
        side = sidecars[i % SIDECARS]
        status, served, header = await ask(side, "t")
        # Every sidecar read the total after the last request: each decides on the same figure.
        if expected >= PER_HOUR_NANO:
            assert status == 429, (i, expected)
        elif expected >= 0.8 * PER_HOUR_NANO:
            assert (status, served, header) == (200, "small", "small; from=big; reason=spend"), (i, expected)
        else:
            assert (status, served, header) == (200, "big", None), (i, expected)
        expected += {"big": big, "small": small, "": 0}[served]
        outcomes.append((status, served))
        await synced(sidecars)
    served_big = sum(1 for s, m in outcomes if m == "big")
    assert served_big == -(-int(0.8 * PER_HOUR_NANO) // big)  # the request that reached 80 % was the last
    assert any(m == "small" for _, m in outcomes) and outcomes[-1][0] == 429
    # Whitelisted: keeps the large model at 100 %, and its spend counts.
    for side in sidecars:
        assert await ask(side, "vip") == (200, "big", None)
        expected += big
    await synced(sidecars)
    for side in sidecars:
        assert await ask(side, "t", "small") == (429, "", None)  # at 100 % every model is refused
    assert hour_total(redis_url, scope(workload), hour) == expected
    # Exact: the upstream's own usage, priced, is what Redis holds.
    billed = sum(cost(str(r["model"]), r["prompt"], r["generation"]) for r in _served(upstream))
    assert billed == expected
    for side in sidecars:
        assert sample(side, "tokenscaler_policy_spend_ratio", scope=scope(workload)) == pytest.approx(
            expected / PER_HOUR_NANO
        )
        assert in_force(side, workload, "spend_refuse_all") == 1
        assert sample(side, "tokenscaler_policy_rejections_total", tenant="t", reason="spend") >= 1
    # The hour rolls over (on the policies' clock): everyone is back on the large model.
    movable.shift = movable.base + 3600.0
    next_hour = spend.hour_of(sidecars[0].policy.redis_clock.now())
    assert next_hour != hour
    for side in sidecars:
        assert await ask(side, "t") == (200, "big", None)
    await synced(sidecars)
    assert hour_total(redis_url, scope(workload), next_hour) == SIDECARS * big
    assert hour_total(redis_url, scope(workload), hour) == expected
    for side in sidecars:
        assert in_force(side, workload, "spend_refuse_all") == 0
        assert in_force(side, workload, "spend_downgrade") == 0


def _served(upstream: FakeUpstream) -> list[dict[str, Any]]:
    """What the fake model server served: model, prompt and generated tokens per request."""
    out = []
    for _method, _path, _headers, body in upstream.requests:
        doc = json.loads(body)
        out.append({"model": doc["model"], "prompt": prompt_tokens_of(doc), "generation": doc["max_tokens"]})
    return out


async def test_spend_batches_sent_again_are_counted_once(
    guarded: tuple[list[Sidecar], MovableClock], workload: str, redis_url: str
) -> None:
    sidecars, _ = guarded
    side = sidecars[0]
    assert side.policy is not None
    store = side.policy.store
    hour = "2025030113"
    keys = spend_keys(scope(workload), hour, "batch-1")
    assert (await store.spend(keys, 1234)).total == 1234
    assert (await store.spend(keys, 1234)).total == 1234  # its reply was lost: sent again, once
    assert (await store.spend(spend_keys(scope(workload), hour, "batch-2"), 1)).total == 1235
    assert hour_total(redis_url, scope(workload), hour) == 1235


def dcgm_page(util: float) -> str:
    """A DCGM exporter's page: this pod's GPU at ``util`` percent, another pod's idle."""
    return (
        "# TYPE DCGM_FI_DEV_GPU_UTIL gauge\n"
        f'DCGM_FI_DEV_GPU_UTIL{{gpu="0",pod="{socket.gethostname()}"}} {util}\n'
        'DCGM_FI_DEV_GPU_UTIL{gpu="1",pod="someone-else"} 3\n'
    )


async def test_busy_trigger_hysteresis_with_a_dcgm_exporter_and_the_model_servers_kv_cache(
    start_sidecar: StartSidecar, upstream: FakeUpstream, policy_file: Path, workload: str
) -> None:
    write_policy(
        policy_file,
        {
            "scope": scope(workload),
            "downgrade": {
                "big": {
                    "to": "small",
                    "whenBusy": {"gpuUtilAbove": 0.9, "gpuUtilBelow": 0.6, "for": "600s", "leaveAfter": 120},
                },
                "medium": {"to": "small", "whenBusy": {"kvCacheAbove": 0.9, "for": 60, "leaveAfter": 60}},
            },
            "tenants": {"vip": {"keepModel": True}},
        },
    )
    now = [0.0]
    dcgm = FakeUpstream()  # a DCGM exporter: only its /metrics is read
    url = await dcgm.start() + "/metrics"
    try:
        side = await start_sidecar(
            policy=policy_file, dcgm_url=url, policy_clock=Clock(monotonic=lambda: now[0])
        )
        engine = side.policy
        assert engine is not None

        async def at(t: float, util: float) -> frozenset[str]:
            now[0] = t  # the time first: a background tick in between reads the old value at the new time
            dcgm.metrics_text = dcgm_page(util)
            await engine.busy.poll()
            return engine.busy.models

        assert await at(0, 95) == frozenset()
        assert await at(300, 95) == frozenset()
        assert await at(400, 50) == frozenset()  # below: the count restarts
        assert await at(500, 97) == frozenset()
        assert await at(1099, 97) == frozenset()
        assert (await ask(side, "t"))[1:] == ("big", None)
        assert await at(1100, 97) == {"big"}  # 600 s above 90 %
        assert in_force(side, workload, "busy_downgrade", "big") == 1
        assert (await ask(side, "t"))[1:] == ("small", "small; from=big; reason=busy")
        assert (await ask(side, "vip"))[1:] == ("big", None)
        assert await at(1500, 75) == {"big"}  # between the thresholds: no flapping
        assert await at(3000, 50) == {"big"}
        assert await at(3119, 50) == {"big"}
        assert await at(3120, 50) == frozenset()  # 120 s below 60 %
        assert (await ask(side, "t"))[1:] == ("big", None)
        assert in_force(side, workload, "busy_downgrade", "big") == 0

        # Without DCGM: the model server's own KV-cache gauge, as the sidecar reads it (the time
        # first: a background tick that reads it meanwhile starts the count at 4000).
        now[0] = 4000
        upstream.metrics_text = "# TYPE vllm:kv_cache_usage_perc gauge\nvllm:kv_cache_usage_perc 0.97\n"
        assert side.server_gauges is not None
        for _ in range(300):
            gauges = side.server_gauges.latest()
            if gauges is not None and gauges.kv_usage == pytest.approx(0.97):
                break
            await asyncio.sleep(0.01)
        assert await at(4000, 10) == frozenset()
        assert await at(4060, 10) == {"medium"}
        assert (await ask(side, "t", "medium"))[1:] == ("small", "small; from=medium; reason=busy")
        # An exporter page that is not Prometheus text: GPU utilisation unknown, asked again later.
        dcgm.metrics_text = "DCGM_FI_DEV_GPU_UTIL{gpu=0 not prometheus\n"
        now[0] = 4100
        await engine.busy.poll()
        assert "gpu_util" not in engine.busy.readings and engine.busy.readings["kv_cache"] == 0.97
        # A reload that drops the rule's whenBusy turns its action off.
        write_policy(
            policy_file,
            {"scope": scope(workload), "downgrade": {"medium": {"to": "small", "atBudgetRatio": 0.9}}},
        )
        assert engine.reload() and engine.busy.models == frozenset()
        assert in_force(side, workload, "busy_downgrade", "medium") == 0
    finally:
        await dcgm.stop()


async def test_spend_counted_while_redis_is_away_reaches_it_when_it_answers(
    start_sidecar: StartSidecar, upstream: FakeUpstream, tmp_path: Path, own_redis: LocalRedis
) -> None:
    policy_file = write_policy(
        tmp_path / "policy.yaml",
        {
            "redisTimeoutMs": 200,
            "prices": {"big": {"prompt": 0.001, "generation": 0.002}, "small": 0.001},
            "downgrade": {"big": {"to": "small"}},
            "spendGuard": {"perHour": 100},
        },
    )
    movable = MovableClock()
    side = await start_sidecar(policy=policy_file, redis_url=own_redis.url, policy_clock=movable.clock)
    await movable.synced([side])
    engine = side.policy
    assert engine is not None
    scope_name = engine.policy.scope
    big = cost("big", prompt_tokens_of({"messages": MESSAGES}), MAX_TOKENS)
    hour = spend.hour_of(engine.redis_clock.now())
    assert await ask(side, "t") == (200, "big", None)
    await synced([side])
    assert hour_total(own_redis.url, scope_name, hour) == big
    port = own_redis.port
    own_redis.process.terminate()
    own_redis.process.wait()
    for _ in range(3):
        assert await ask(side, "t") == (200, "big", None)
    await _settled(side)
    assert not await engine.spend.sync()  # Redis is away: kept
    assert engine.spend.unsent == 3 * big and engine.spend.spent() == 4 * big
    restarted = LocalRedis.start(port=port)
    try:
        await engine.tick()  # Redis answers again: the spend kept goes out
        assert hour_total(restarted.url, scope_name, hour) == 3 * big  # a fresh Redis: what it missed
        assert engine.spend.unsent == 0
    finally:
        restarted.stop()


async def test_a_reload_without_the_spend_guard_turns_its_action_off(
    guarded: tuple[list[Sidecar], MovableClock], policy_file: Path, workload: str
) -> None:
    sidecars, _ = guarded
    side = sidecars[0]
    engine = side.policy
    assert engine is not None
    engine.spend.add("big", 10_000, 10_000)  # 0.03: three times the hour's 0.01
    await synced([side])
    assert in_force(side, workload, "spend_refuse_all") == 1
    assert await ask(side, "t") == (429, "", None)
    write_policy(
        policy_file,
        {
            "scope": scope(workload),
            "downgrade": {"big": {"to": "small", "whenBusy": {"waitingAbove": 1, "for": 0}}},
        },
    )
    assert engine.reload()
    assert in_force(side, workload, "spend_refuse_all") == 0
    assert await ask(side, "t") == (200, "big", None)
