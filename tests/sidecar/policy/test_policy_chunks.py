"""Reservation chunks: a tenant's budget and rate reserved ahead, admitted from locally.

Pure parts (sizing, a chunk's accounting) by hand; the checkpoint script against a real
Redis (sequence numbers, closing, a chunk released by its lease); the engine against a real
Redis at a rate where chunks are taken: most requests admitted with no round trip, and
after it closes Redis holds exactly the real usage in the budget and in the rate limits'
TATs, with nothing left reserved; a Redis that stops answering while chunks admit.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import signal
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client import CollectorRegistry

from sidecar import openai
from sidecar.policy import PolicyEngine, chunks, ratelimit
from sidecar.policy.budgets import periods
from sidecar.policy.chunks import Chunk, Chunks, Demand, size
from sidecar.policy.clock import Clock
from sidecar.policy.engine import Admission
from sidecar.policy.schema import Budget, Price
from sidecar.policy.store import Admitted, Item, Store, TenantKeys, checkpoint_args, tenant_keys
from sidecar.policy.tickets import Ticket
from tests.sidecar.policy.test_policy_proxy import MESSAGES, write_policy
from token_scaler.redis_channel import Channel
from token_scaler.redis_conn import LocalRedis

# -- sizing and accounting (pure)


def busy(rps: float, cost: int, tokens: int) -> Demand:
    """The demand estimate after a steady ``rps`` for a long while."""
    demand = Demand(0.0)
    for i in range(int(rps * 20)):
        demand.add(i / rps, cost, tokens)
    return demand


def test_a_chunk_is_a_second_of_traffic_capped_by_a_share_of_what_is_left() -> None:
    demand = busy(100, 50, 40)
    now = demand.at
    # About a second of traffic: 100 requests of cost 50 / 40 tokens (estimate within 5 %).
    got = size(demand, now, seconds=1.0, min_rps=20, budget_left=None, bursts=[], peers=1)
    assert got is not None
    assert 4750 <= got.cost <= 5250 and 3800 <= got.tokens <= 4200 and got.least == 100
    # A budget with 40,000 left among 2 sidecars: at most 40,000 / (4 x 2) = 5,000 → uncapped;
    # with 8,000 left: 1,000, and the tokens scale alike.
    capped = size(demand, now, seconds=1.0, min_rps=20, budget_left=8_000, bursts=[], peers=2)
    assert capped is not None and capped.cost == 1000 and abs(capped.tokens - 800) <= 1
    # A rate limit's burst of 4,000 tokens among 1 sidecar: 1,000 tokens at most.
    burst = size(demand, now, seconds=1.0, min_rps=20, budget_left=None, bursts=[4000.0], peers=1)
    assert burst is not None and burst.tokens == 1000 and abs(burst.cost - 1250) <= 1
    # Less than two requests' worth: no chunk, every request reserves alone.
    assert size(demand, now, seconds=1.0, min_rps=20, budget_left=300, bursts=[], peers=1) is None
    assert size(demand, now, seconds=1.0, min_rps=20, budget_left=None, bursts=[300.0], peers=1) is None
    # Thin traffic: none either; nor once the traffic stops.
    assert size(busy(10, 50, 40), 20.0, seconds=1.0, min_rps=20, budget_left=None, bursts=[], peers=1) is None
    assert size(demand, now + 1, seconds=1.0, min_rps=20, budget_left=None, bursts=[], peers=1) is None
    # One request after a quiet while is not traffic; one a second, steadily, is (at 0.5/s),
    # between its requests too, and again four requests after a pause.
    once = busy(1, 50, 40)
    once.add(once.at + 60, 50, 40)
    assert size(once, once.at, seconds=1.0, min_rps=0.5, budget_left=None, bursts=[], peers=1) is None
    steady = busy(1, 50, 40)
    slow = size(steady, steady.at + 0.9, seconds=1.0, min_rps=0.5, budget_left=None, bursts=[], peers=1)
    assert slow is not None and 400 <= slow.cost <= 401
    # One request in 10 s, sized just after one (as a request sizes it): checkpoints every 4
    # gaps, retired after 2 spans of its 8 requests, whatever the recent estimate says.
    rare = Demand(0.0)
    for i in range(10):
        rare.add(i * 10.0, 50, 40)
    thin_size = size(rare, rare.at, seconds=1.0, min_rps=0.1, budget_left=None, bursts=[], peers=1)
    assert thin_size is not None and 400 <= thin_size.cost <= 401
    assert 39 <= thin_size.checkpoint_s <= 41 and 159 <= thin_size.age_s <= 161
    for gap in range(1, 5):
        once.add(once.at + 1, 50, 40)
        back = size(once, once.at, seconds=1.0, min_rps=0.5, budget_left=None, bursts=[], peers=1)
        assert (back is not None) == (gap == 4)
    # Thin traffic (2/s): at least 8 requests' worth, checkpointed every 4 usual gaps (about
    # 2 s), retired after 8 s (as a busy tenant's; two spans of its 8 requests, at most).
    thin = busy(2, 50, 40)
    small = size(thin, thin.at, seconds=1.0, min_rps=1, budget_left=None, bursts=[], peers=1)
    assert small is not None and small.cost == 400 and 1.5 <= small.checkpoint_s <= 2.1
    assert 8 <= small.age_s <= 8.5


def ticket(tenant: str = "t") -> Ticket:
    return Ticket(
        id="c1", keys=tenant_keys("s", tenant, "20260101", "202601", None), tenant=tenant, day="20260101",
        month="202601", budget=Budget(daily=10_000), price=Price(0, 0), tenant_interval=0.0,
        model_interval=0.0, cost=1000, reserved=True, tokens=1000,
    )  # fmt: skip


def test_a_chunk_holds_its_undrawn_part_and_its_draws_in_flight_until_retired() -> None:
    registry = Chunks()
    usual = busy(10, 300, 300)
    chunk = Chunk(ticket(), 1000, 1000, [], taken=0.0, used=0.0, wide_counted=0, until=100.0)
    registry.add("k", chunk)
    assert registry.undrawn == {"t": 1000}
    assert registry.draw("k", "t", 300, 300, 1.0, usual) is chunk
    assert registry.draw("k", "t", 300, 300, 1.0, usual) is chunk
    assert registry.undrawn == {"t": 400} and chunk.held() == (1000, 1000)
    chunk.end(300, 300, 120, 120)  # used 120 of its 300
    assert chunk.held() == (700, 700) and (chunk.real_cost, chunk.real_tokens) == (120, 120)
    # 400 left: a request of 300 fits, then one of 300 does not; 100 left < 2 x 300: retired.
    assert registry.draw("k", "t", 300, 300, 2.0, usual) is chunk
    assert registry.draw("k", "t", 300, 300, 2.0, usual) is None
    assert chunk.retired and registry.undrawn == {} and not chunk.final
    assert chunk.held() == (600, 600)  # the two draws in flight; the undrawn 100 goes back
    chunk.end(300, 300, 300, 300)
    chunk.end(300, 300, 10, 10)
    assert chunk.final and chunk.held() == (0, 0) and chunk.real_cost == 430
    assert registry.dirty(5.0) == ([chunk], math.inf) and registry.dirty(5.0) == ([], math.inf)
    registry.forget(chunk)
    assert not registry and list(registry) == []


def test_a_chunk_is_checkpointed_at_most_every_checkpoint_interval_until_retired() -> None:
    registry = Chunks()
    usual = busy(10, 10, 10)
    every = chunks.CHECKPOINT_EVERY_S
    chunk = Chunk(ticket(), 1000, 1000, [], taken=0.0, used=0.0, wide_counted=0, until=100.0)
    registry.add("k", chunk)
    for at in (1.0, 1.0 + every / 10):
        assert registry.draw("k", "t", 10, 10, at, usual) is chunk
        registry.end(chunk, 10, 10, 5, 5)
    sent = 1.0 + every / 10
    assert registry.dirty(sent) == ([chunk], math.inf)
    assert registry.draw("k", "t", 10, 10, sent + every / 2, usual) is chunk
    registry.end(chunk, 10, 10, 5, 5)
    assert registry.dirty(sent + every / 2) == ([], sent + every)  # its turn: an interval on
    assert registry.dirty(sent + every) == ([chunk], math.inf)
    assert registry.draw("k", "t", 10, 10, sent + every * 1.1, usual) is chunk
    registry.end(chunk, 10, 10, 5, 5)
    registry.retire(chunk)
    assert registry.dirty(sent + every * 1.1) == ([chunk], math.inf)  # retired: at once


def test_a_thin_tenants_chunk_is_checkpointed_at_its_own_spacing() -> None:
    """Each chunk at its own ``checkpoint_s`` (four of its tenant's gaps when longer than the
    interval); the next due is the soonest of those waiting."""
    registry = Chunks()
    usual = busy(10, 10, 10)
    busy_one = Chunk(ticket("a"), 1000, 1000, [], taken=0.0, used=0.0, wide_counted=0, until=100.0)
    thin = Chunk(
        ticket("b"), 1000, 1000, [], taken=0.0, used=0.0, wide_counted=0, until=100.0, checkpoint_s=4.0
    )
    registry.add("a", busy_one)
    registry.add("b", thin)
    for key, chunk in (("a", busy_one), ("b", thin)):
        assert registry.draw(key, key, 10, 10, 1.0, usual) is chunk
        registry.end(chunk, 10, 10, 5, 5)
    assert registry.dirty(1.0) == ([busy_one, thin], math.inf)
    for key, chunk in (("a", busy_one), ("b", thin)):
        assert registry.draw(key, key, 10, 10, 1.5, usual) is chunk
        registry.end(chunk, 10, 10, 5, 5)
    assert registry.dirty(1.5) == ([], 1.0 + chunks.CHECKPOINT_EVERY_S)
    assert registry.dirty(2.0) == ([busy_one], 5.0)
    assert registry.dirty(5.0) == ([thin], math.inf)


def test_usage_past_a_reservation_comes_out_of_the_undrawn_part() -> None:
    registry = Chunks()
    usual = busy(10, 300, 300)
    chunk = Chunk(ticket(), 1000, 1000, [], taken=0.0, used=0.0, wide_counted=0, until=100.0)
    registry.add("k", chunk)
    for _ in range(3):
        assert registry.draw("k", "t", 300, 300, 1.0, usual) is chunk
    # A prompt estimated short: 350 used of 300 reserved; the 50 come out of the 100 undrawn.
    registry.end(chunk, 300, 300, 350, 350)
    assert chunk.left == (50, 50) and registry.undrawn == {"t": 50}
    assert chunk.held() == (650, 650)  # + 350 charged = the 1000 granted, not 1050
    registry.end(chunk, 300, 300, 400, 400)  # 100 over, 50 left to take it from
    assert chunk.left == (0, 0) and chunk.held() == (300, 300)
    assert chunk.held()[0] + chunk.real_cost == 1050  # past the grant by what nothing covered


def test_a_large_request_does_not_retire_a_chunk_with_room_for_the_usual_ones() -> None:
    registry = Chunks()
    chunk = Chunk(ticket(), 1000, 1000, [], taken=0.0, used=0.0, wide_counted=0, until=100.0)
    registry.add("k", chunk)
    usual = busy(10, 30, 30)
    assert registry.draw("k", "t", 2000, 2000, 1.0, usual) is None  # reserves on its own
    assert not chunk.retired
    assert registry.draw("k", "t", 30, 30, 1.0, usual) is chunk


def test_a_chunk_admits_only_until_its_deadline() -> None:
    registry = Chunks()
    chunk = Chunk(ticket(), 1000, 1000, [], taken=0.0, used=0.0, wide_counted=0, until=5.0)
    registry.add("k", chunk)
    demand = busy(10, 10, 10)
    assert registry.draw("k", "t", 10, 10, 4.9, demand) is chunk
    assert registry.draw("k", "t", 10, 10, 5.0, demand) is None
    assert not chunk.retired  # passed over: a renewal extends it
    chunk.until = 10.0
    assert registry.draw("k", "t", 10, 10, 5.0, demand) is chunk


def test_idle_and_old_chunks_are_retired() -> None:
    registry = Chunks()
    idle = Chunk(ticket(), 1000, 1000, [], taken=0.0, used=0.0, wide_counted=0, until=100.0)
    busy_ = Chunk(ticket("u"), 1000, 1000, [], taken=0.0, used=0.0, wide_counted=0, until=100.0)
    registry.add("a", idle)
    registry.add("b", busy_)
    busy_.draw(10, 10, 1.5)
    registry.expire(1.6, seconds=1.0)
    assert idle.retired and not busy_.retired
    busy_.draw(10, 10, 8.5)
    registry.expire(8.6, seconds=1.0)
    assert not busy_.retired  # its age counts from its first draw, at 1.5
    busy_.draw(10, 10, 9.4)
    registry.expire(9.5, seconds=1.0)  # 8 chunk lengths after it
    assert busy_.retired
    # Thin traffic: idle for 3 times the time its tenant's last 4 gaps took (4 x 0.5 s here).
    for at in (6.0, 6.5, 7.0, 7.5, 8.0):
        registry.seen("c", at, 10, 10)
    thin = Chunk(ticket("v"), 1000, 1000, [], taken=8.0, used=8.0, wide_counted=0, until=100.0, age_s=60.0)
    registry.add("c", thin)
    registry.expire(13.9, seconds=1.0)
    assert not thin.retired  # 5.9 s idle: within its 6 s
    registry.expire(14.1, seconds=1.0)
    assert thin.retired


def test_a_successor_is_asked_for_once_a_chunk_is_past_half_its_age() -> None:
    """A thin tenant's chunk may age out before it is half drawn: its successor is asked for
    while it still admits, so the next request does not find none and wait for Redis; once
    granted, the old one is retired. Age counts from the first draw: a successor taken
    ahead does not age while it waits its turn."""
    registry = Chunks()
    usual = busy(1, 10, 10)
    target = chunks.Size(cost=1000, tokens=1000, least=100, checkpoint_s=1.0, age_s=20.0)
    chunk = Chunk(ticket(), 1000, 1000, [], taken=0.0, used=0.0, wide_counted=0, until=100.0, age_s=20.0)
    registry.add("k", chunk)
    assert registry.draw("k", "t", 10, 10, 5.0, usual) is chunk
    assert not registry.wants("k", target, 14.9)  # nearly all of it left
    assert registry.wants("k", target, 15.0)
    assert registry.draw("k", "t", 10, 10, 15.0, usual) is chunk  # and it still admits
    successor = Chunk(
        ticket(), 1000, 1000, [], taken=15.1, used=15.1, wide_counted=0, until=100.0, age_s=20.0
    )
    registry.succeeded("k", 15.1)  # granted: the old one's unused part goes back
    registry.add("k", successor)
    assert chunk.retired and registry.chunks["k"] == [successor] and registry.undrawn == {"t": 1000}
    assert not registry.wants("k", target, 40.0)  # not drawn yet: not ageing


def test_rate_limit_headers_of_a_draw_count_the_chunk_undrawn_tokens() -> None:
    limit = ratelimit.Limit.of(60_000, 10.0)  # 1 token/ms, burst 10,000 tokens
    chunk = Chunk(ticket(), 1000, 1000, [(limit, 4000.0)], taken=10.0, used=10.0, wide_counted=0, until=100.0)
    chunk.draw(100, 100, 10.5)
    headers = chunk.remaining_headers(10.5)
    # Reset 4,000 ms at the grant, 500 ms ago: 3,500 ms → 6,500 tokens free + 900 undrawn.
    assert headers["x-ratelimit-remaining-tokens"] == "7400"
    assert headers["x-ratelimit-reset-tokens"] == "3.5s"
    assert headers["x-ratelimit-limit-tokens"] == "60000"


# -- the checkpoint script (real Redis)


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[Store]:
    channel = Channel.from_url(redis_url)
    yield Store(channel)
    await channel.close()


def admit_args(day: str, month: str, cost: int, lease_ms: int = 60_000) -> dict[str, Any]:
    return dict(
        cost=cost, day_limit=100_000, month_limit=0, least=0, tokens=cost, tenant_rate=(1.0, 1e9),
        model_rate=(0.0, 0.0), lease_ms=lease_ms, day=day, month=month,
    )  # fmt: skip


async def fresh_tenant(store: Store) -> tuple[str, str, TenantKeys]:
    """Today, this month (Redis' clock) and the keys of a new tenant."""
    day, month = periods(await store.time())
    return day, month, tenant_keys("chunks-test", f"t-{uuid.uuid4().hex[:8]}", day, month, None)


def state(keys: TenantKeys, seq: int, held: int, charged: int, *, interval: float) -> list[Item]:
    """A checkpoint of chunk ``c`` (tokens and cost alike), a daily budget, a tenant limit."""
    args = checkpoint_args(
        id="c", seq=seq, held=(held, held), charged=(charged, charged), daily=True, monthly=False,
        tenant_interval=interval, model_interval=0.0,
    )  # fmt: skip
    return [(keys, args)]


async def test_a_checkpoint_applies_once_in_sequence_order_and_closes_the_chunk(
    store: Store, redis_url: str
) -> None:
    day, month, keys = await fresh_tenant(store)
    r = redis.Redis.from_url(redis_url)
    try:
        admitted: Admitted = await store.admit(keys, id="c", **admit_args(day, month, 1000))
        assert admitted.granted == 1000 and int(r.get(keys.day) or 0) == 1000
        tat0 = float(r.get(keys.rate) or 0)

        async def checkpoint(seq: int, held: int, charged: int) -> int:
            [settled] = await store.checkpoint_many(state(keys, seq, held, charged, interval=1.0))
            assert not isinstance(settled, BaseException)
            return settled.applied

        assert await checkpoint(1, 700, 120) == 1  # 300 drawn and ended, 120 of them used
        assert int(r.get(keys.day) or 0) == 820
        assert await checkpoint(1, 700, 120) == 0  # sent twice: once
        assert await checkpoint(3, 400, 300) == 1
        assert await checkpoint(2, 650, 150) == 0  # overtaken by 3: ignored
        assert int(r.get(keys.day) or 0) == 700
        # The rate limit's TAT moved by the same tokens (1 ms each): 1000 → 700.
        assert abs(float(r.get(keys.rate) or 0) - (tat0 - 300)) < 1.0
        assert await checkpoint(4, 0, 450) == 1  # retired, nothing in flight: closed
        assert int(r.get(keys.day) or 0) == 450
        assert r.hlen(keys.res) == 0 and r.zcard(keys.lease) == 0
        assert await checkpoint(4, 0, 450) == 0  # a lost reply, sent again
        assert int(r.get(keys.day) or 0) == 450
    finally:
        r.delete(*keys, f"{keys.res[:-4]}:swept:c")
        r.close()


async def test_a_chunk_released_by_its_lease_keeps_what_was_charged_and_charges_the_rest_late(
    store: Store, redis_url: str
) -> None:
    day, month, keys = await fresh_tenant(store)
    r = redis.Redis.from_url(redis_url)

    def checkpoint(seq: int, held: int, charged: int) -> list[Item]:
        return state(keys, seq, held, charged, interval=0.0)

    try:
        await store.admit(keys, id="c", **admit_args(day, month, 1000, lease_ms=100))
        [done] = await store.checkpoint_many(checkpoint(1, 800, 150))
        assert int(r.get(keys.day) or 0) == 950
        await asyncio.sleep(0.15)  # its sidecar stalls: the lease ends
        other = await store.admit(keys, id="x", **admit_args(day, month, 10))
        assert other.expired == 1
        assert int(r.get(keys.day) or 0) == 150 + 10  # what it held came back, the charge stayed
        # Its sidecar wakes: what was charged since is charged in full, once.
        [late] = await store.checkpoint_many(checkpoint(2, 0, 400))
        assert not isinstance(late, BaseException) and late.applied == 3
        assert int(r.get(keys.day) or 0) == 400 + 10
        [again] = await store.checkpoint_many(checkpoint(2, 0, 400))
        assert not isinstance(again, BaseException) and again.applied == 0
        assert int(r.get(keys.day) or 0) == 400 + 10
        assert not isinstance(done, BaseException)
    finally:
        r.delete(*keys, f"{keys.res[:-4]}:swept:c")
        r.close()


# -- the engine (real Redis)

TPM = 60_000  # 1 token per ms
BODY = json.dumps({"model": "m", "messages": MESSAGES, "max_tokens": 20}).encode()


def busy_policy(**chunks: object) -> dict[str, Any]:
    """A budget and all three rate limits (1 token/ms, a minute of burst); chunks from 5/s."""
    return {
        "reservationChunks": {"minRequestsPerSecond": 5, **chunks},
        "defaults": {
            "maxTokens": {"default": 20},
            "budget": {"daily": 1_000_000},
            "rateLimit": {"tokensPerMinute": TPM, "burstSeconds": 60, "perModel": {"m": TPM}},
        },
        "modelLimits": {"m": {"tokensPerMinute": TPM, "burstSeconds": 60}},
    }


@dataclass
class Run:
    engine: PolicyEngine
    registry: CollectorRegistry
    scope: str
    redis: redis.Redis

    def key(self, suffix: str, tenant: str = "acme") -> str:
        return f"tokenscaler:v1:{{policy:{self.scope}:{tenant}}}:{suffix}"

    def admissions(self, path: str) -> float:
        return self.registry.get_sample_value("tokenscaler_policy_admissions_total", {"path": path}) or 0.0

    def errors(self, op: str) -> float:
        return self.registry.get_sample_value("tokenscaler_policy_redis_errors_total", {"op": op}) or 0.0

    async def until(self, done: Callable[[], bool], within_s: float = 10.0) -> bool:
        """Wait for the engine's background work (checkpoints go out at their interval)
        to make ``done`` true; whether it did."""
        for _ in range(int(within_s / 0.02)):
            if done():
                return True
            await asyncio.sleep(0.02)
        return done()

    async def used_today(self, tenant: str = "acme") -> int:
        day = periods(await self.engine.store.time())[0]
        return int(self.redis.get(self.key(f"budget:d:{day}", tenant)) or 0)

    async def admit(self, tenant: str = "acme") -> Admission:
        parsed = openai.parse_request(openai.Kind.CHAT, BODY)
        assert parsed is not None
        return await self.engine.admit({"X-Tenant-ID": tenant}, parsed, BODY, 10)

    async def serve(
        self, count: int, rng: random.Random, tenant: str = "acme"
    ) -> tuple[int, list[Admission]]:
        """Admit ``count`` requests one after the other and settle each at a random real usage
        (the prompt off the estimate by -3..+3); the real tokens in total and the admissions."""
        real = 0
        seen = []
        for _ in range(count):
            admission = await self.admit(tenant)
            assert admission.rejection is None, admission.rejection
            seen.append(admission)
            prompt, generation = 10 + rng.randint(-3, 3), rng.randint(0, 20)
            real += prompt + generation
            self.engine.settle(admission, prompt, generation)
            await asyncio.sleep(0.002)
        return real, seen


@contextlib.asynccontextmanager
async def running(
    tmp_path: Path, redis_url: str, doc: dict[str, Any], clock: Clock | None = None
) -> AsyncIterator[Run]:
    """An engine on a policy of its own scope, its clock read; its keys removed after."""
    scope = f"chunks-{uuid.uuid4().hex[:8]}"
    policy = tmp_path / f"{scope}.yaml"
    write_policy(policy, {"scope": scope, **doc})
    registry = CollectorRegistry()
    engine = PolicyEngine(policy, Channel.from_url(redis_url), registry, workload=f"{scope}/w", clock=clock)
    client = redis.Redis.from_url(redis_url)
    try:
        await engine.tick()
        yield Run(engine, registry, scope, client)
    finally:
        with contextlib.suppress(Exception):
            await engine.close(0.5)
        await engine.store.channel.close()
        with contextlib.suppress(redis.RedisError):
            keys = client.keys(f"tokenscaler:v1:{{policy:{scope}*")
            if keys:
                client.delete(*keys)
        client.close()


async def test_chunks_admit_most_requests_and_redis_ends_with_exactly_the_real_usage(
    tmp_path: Path, redis_url: str
) -> None:
    async with running(tmp_path, redis_url, busy_policy()) as run:
        start_s, start_us = run.redis.time()
        started_ms = start_s * 1000 + start_us / 1000
        real, seen = await run.serve(600, random.Random(3))
        by_chunk = run.admissions("chunk")
        assert by_chunk > 500 and run.admissions("redis") + by_chunk == 600
        assert any("x-ratelimit-remaining-tokens" in a.headers for a in seen[-10:])
        assert await run.engine.close(5.0)
        assert await run.used_today() == real
        assert run.redis.hlen(run.key("res")) == 0 and run.redis.zcard(run.key("lease")) == 0
        # The rate limits hold exactly the real tokens, 1 ms each, from the first admission on
        # (60 s of burst: their TATs never fell behind Redis' clock in this run).
        wide = f"tokenscaler:v1:{{policy:{run.scope}/model/m}}:rate"
        for key in (run.key("rate"), run.key("rate:m:m"), wide):
            tat = float(run.redis.get(key) or 0)
            assert abs(tat - started_ms - real) < 100, (key, tat - started_ms, real)
        taken = run.registry.get_sample_value("tokenscaler_policy_chunks_total", {"result": "taken"}) or 0
        print(f"\n600 requests: {by_chunk:.0f} from {taken:.0f} chunks; {real} tokens")


async def test_a_thin_tenant_is_admitted_from_chunks_and_a_rare_one_is_not(
    tmp_path: Path, redis_url: str
) -> None:
    """Chunks by default from 0.5 requests/s over a tenant's last 4 gaps: a tenant at one a
    second is admitted from chunks after its fifth request; one a minute never takes one. The
    engine's monotonic clock is moved by hand (a second a request) for a fast test."""
    clock = [1000.0]
    doc = {"defaults": {"maxTokens": {"default": 20}, "budget": {"daily": 1_000_000}}}
    async with running(tmp_path, redis_url, doc, Clock(monotonic=lambda: clock[0])) as run:
        rng, real = random.Random(4), 0

        async def one(tenant: str, gap_s: float) -> bool:
            """Whether it came from a chunk."""
            nonlocal real
            clock[0] += gap_s
            admission = await run.admit(tenant)
            assert admission.rejection is None and admission.ticket is not None
            chunked = admission.chunk is not None
            prompt, generation = 10 + rng.randint(-3, 3), rng.randint(0, 20)
            real += prompt + generation
            run.engine.settle(admission, prompt, generation)
            if run.engine.ahead.asking:  # a chunk asked for comes back
                await asyncio.wait(set(run.engine.ahead.asking), timeout=10)
            return chunked

        for _ in range(6):
            await one("rare", 60.0)
        assert run.admissions("chunk") == 0 and run.admissions("redis") == 6
        assert run.registry.get_sample_value("tokenscaler_policy_chunks_total", {"result": "taken"}) is None
        from_chunks = [await one("thin", 1.0) for _ in range(30)]
        assert from_chunks[:5] == [False] * 5 and all(from_chunks[5:]), from_chunks
        assert await run.engine.close(5.0)
        assert await run.used_today("rare") + await run.used_today("thin") == real
        assert run.redis.hlen(run.key("res", "thin")) == 0


async def test_near_the_budget_chunks_stop_and_it_is_never_passed_by_more_than_a_reservation(
    tmp_path: Path, redis_url: str
) -> None:
    doc = {
        "reservationChunks": {"minRequestsPerSecond": 5},
        "defaults": {"maxTokens": {"default": 20}, "budget": {"daily": 6_000}},
    }
    async with running(tmp_path, redis_url, doc) as run:
        real = refused = 0
        while refused < 20:
            admission = await run.admit()
            if admission.rejection is not None:
                refused += 1
                await asyncio.sleep(0.01)  # refunds reopen room
                continue
            real += 30
            run.engine.settle(admission, 10, 20)  # all it reserved
            await asyncio.sleep(0.002)
        assert await run.engine.close(5.0)
        used = await run.used_today()
        assert used == real and 6_000 - 30 < used <= 6_000
        assert run.admissions("chunk") > 50
        assert run.redis.hlen(run.key("res")) == 0


async def test_chunks_keep_admitting_while_redis_does_not_answer_and_reconcile_after(
    tmp_path: Path,
) -> None:
    server = LocalRedis.start()
    try:
        async with running(tmp_path, server.url, busy_policy(seconds=5)) as run:
            real, _ = await run.serve(200, random.Random(5))
            assert run.admissions("chunk") > 100
            server.process.send_signal(signal.SIGSTOP)  # no answer, no reset
            stopped_at = run.admissions("chunk")
            more, _ = await run.serve(50, random.Random(6))
            real += more
            # Every one of them came out of a chunk already reserved: none without Redis.
            assert run.admissions("chunk") == stopped_at + 50
            assert run.admissions("without_redis") == 0
            for _ in range(100):  # the next checkpoint times out: Redis is marked away
                if run.engine.outage.down:
                    break
                await asyncio.sleep(0.05)
            assert run.engine.outage.down
            server.process.send_signal(signal.SIGCONT)
            await run.engine.tick()
            assert await run.engine.close(5.0)
            assert await run.used_today() == real
            assert run.redis.hlen(run.key("res")) == 0
    finally:
        server.process.send_signal(signal.SIGCONT)
        server.stop()


async def test_without_renewals_a_chunk_stops_admitting_after_half_its_lease(tmp_path: Path) -> None:
    """Redis unreachable: another sidecar may release the chunk once its lease ends; this
    one stops drawing from it at half the lease, so it never admits from a released chunk."""
    server = LocalRedis.start()
    doc = {
        "reservationLeaseSeconds": 2,
        "reservationChunks": {"minRequestsPerSecond": 5, "seconds": 5},
        "defaults": {"maxTokens": {"default": 20}, "budget": {"daily": 10**9}, "failMode": "closed"},
    }
    try:
        async with running(tmp_path, server.url, doc) as run:
            await run.serve(100, random.Random(1))
            assert run.admissions("chunk") > 50
            server.process.send_signal(signal.SIGSTOP)
            stopped = time.monotonic()
            last_from_chunk = refused = 0.0
            while time.monotonic() - stopped < 1.6:
                admission = await run.admit()
                if admission.rejection is None:
                    assert admission.ticket is not None and admission.chunk is not None
                    last_from_chunk = time.monotonic() - stopped
                    run.engine.settle(admission, 10, 20)
                else:
                    refused += 1
                    assert admission.rejection.status == 503  # failMode closed: no chunk, no Redis
                await asyncio.sleep(0.005)
            # Granted (or renewed) before the stop: half of 2 s later, no more draws.
            assert 0 < last_from_chunk <= 1.0 and refused > 0
            assert not await run.engine.close(0.3)  # Redis still away: chunks not closed, said so
            server.process.send_signal(signal.SIGCONT)
    finally:
        server.process.send_signal(signal.SIGCONT)
        server.stop()


async def test_a_chunk_redis_lost_is_retired_and_charged_without_it(tmp_path: Path, redis_url: str) -> None:
    async with running(tmp_path, redis_url, busy_policy(seconds=5)) as run:
        real, _ = await run.serve(200, random.Random(8))
        lost = list(run.engine.ahead.chunks)
        assert lost and await run.until(lambda: all(c.acked[0] == c.real_cost for c in lost))
        # A failover to a replica that missed the chunks' grants, and so all that followed
        # them: their entries, what they held and what was charged to them are gone.
        day = periods(await run.engine.store.time())[0]
        run.redis.decrby(run.key(f"budget:d:{day}"), sum(c.held()[0] + c.real_cost for c in lost))
        run.redis.delete(run.key("res"))
        more, _ = await run.serve(100, random.Random(9))
        assert await run.engine.close(5.0)
        assert run.errors("chunk_lost") == len(lost)  # once each, however many checkpoints
        assert all(chunk.retired for chunk in lost)
        assert await run.used_today() == real + more  # every token served, charged once
        assert run.redis.hlen(run.key("res")) == 0


async def test_sidecars_count_each_other_for_chunk_shares_with_a_budget_alone(
    tmp_path: Path, redis_url: str
) -> None:
    doc = {"defaults": {"budget": {"daily": 10_000}}}
    async with running(tmp_path, redis_url, doc) as run:
        others = [
            PolicyEngine(run.engine.path, Channel.from_url(redis_url), CollectorRegistry(), workload="x/w")
            for _ in range(2)
        ]
        try:
            for engine in others:
                await engine.tick()
            assert others[-1].presence.peers == 3
        finally:
            for engine in others:
                await engine.close(2.0)
                await engine.store.channel.close()


async def test_a_checkpoint_the_script_refuses_keeps_the_chunk_until_its_requests_end(
    tmp_path: Path, redis_url: str
) -> None:
    async with running(tmp_path, redis_url, busy_policy(seconds=5)) as run:
        await run.serve(100, random.Random(2))
        first, second = await run.admit(), await run.admit()
        assert first.ticket is not None and first.chunk is not None
        chunk = first.chunk
        day_key = first.ticket.keys.day
        run.redis.delete(day_key)
        run.redis.hset(day_key, "not", "a counter")  # the checkpoint's INCRBY fails
        run.engine.settle(second, 10, 5)
        assert await run.until(lambda: run.errors("checkpoint_script") >= 1)
        assert chunk.retired and chunk in list(run.engine.ahead.chunks)  # its lease still renewed
        run.engine.settle(first, 10, 5)
        assert await run.until(lambda: chunk not in list(run.engine.ahead.chunks))


async def test_a_model_limit_correction_redis_refuses_is_counted(tmp_path: Path, redis_url: str) -> None:
    async with running(tmp_path, redis_url, busy_policy()) as run:
        key = f"tokenscaler:v1:{{policy:{run.scope}/model/m}}:rate"
        run.redis.hset(key, "not", "a TAT")  # the script's GET fails: an error reply, not a raise
        run.engine.corrections.move(key, -5.0)
        await asyncio.sleep(0.3)
        assert run.errors("move") == 1
