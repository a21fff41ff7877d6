"""Reservation leases: a sidecar that dies mid-request does not hold a tenant's budget.

A reservation is leased; its sidecar renews the lease while the request runs. The tenant's
next admission releases reservations whose lease ended. A settlement that arrives after
its reservation was released charges the real usage in full: nothing is lost either way.
Also: budget periods follow Redis' clock, not the sidecar's.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import aiohttp
import pytest
import redis
from prometheus_client import CollectorRegistry

from bench.sidecar_bench import wait_http
from sidecar import openai
from sidecar.policy import PolicyEngine
from sidecar.policy.budgets import periods
from sidecar.policy.clock import Clock
from sidecar.policy.store import Admitted, Item, Store, settle_args, tenant_keys
from tests.sidecar.conftest import StartSidecar, scope
from tests.sidecar.fake_upstream import FakeUpstream
from tests.sidecar.policy.test_policy_proxy import MESSAGES, sample, sdk, settled, used, write_policy
from token_scaler.redis_channel import Channel
from token_scaler.redis_conn import LocalRedis, connect, free_port


def base(workload: str, tenant: str) -> str:
    return f"tokenscaler:v1:{{policy:{scope(workload)}:{tenant}}}"


async def wait_for(predicate: object, what: str, timeout_s: float = 10.0) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def leased_policy(path: Path, workload: str) -> None:
    """A daily budget and a 2-second lease; a reservation per request (chunks: test_policy_chunks.py)."""
    doc = {
        "scope": scope(workload),
        "reservationLeaseSeconds": 2,
        "reservationChunks": {"seconds": 0},
        "defaults": {"budget": {"daily": 10_000}},
    }
    write_policy(path, doc)


def sidecar_process(
    policy: Path, upstream: int, port: int, redis_url: str, workload: str
) -> subprocess.Popen[bytes]:
    """A sidecar in a process of its own (to be killed), ready to serve."""
    admin = free_port()
    env = {**os.environ, "REDIS_URL": redis_url, "TOKEN_SCALER_WORKLOAD": workload}
    argv = [
        sys.executable, "-m", "token_scaler.cli", "sidecar", "--policy", str(policy),
        "--upstream", f"http://127.0.0.1:{upstream}", "--host", "127.0.0.1", "--port", str(port),
        "--admin-port", str(admin), "--shutdown-delay", "0", "--log-level", "WARNING",
    ]  # fmt: skip
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL)
    wait_http(f"http://127.0.0.1:{admin}/readyz", proc, "the sidecar")
    return proc


async def test_the_reservation_of_a_killed_sidecar_is_released_when_its_lease_ends(
    start_sidecar: StartSidecar, upstream: FakeUpstream, policy_file: Path, workload: str, redis_url: str
) -> None:
    leased_policy(policy_file, workload)
    port = free_port()
    doomed = sidecar_process(policy_file, upstream.port, port, redis_url, workload)
    r = redis.Redis.from_url(redis_url)
    try:
        body = {"model": "m", "messages": MESSAGES, "max_tokens": 500, "stream": True}
        headers = {"X-Tenant-ID": "acme", "X-Fake-Delay": "0.5"}  # ~250 s of stream

        async def long_request() -> None:
            async with aiohttp.ClientSession() as session:
                url = f"http://127.0.0.1:{port}/v1/chat/completions"
                async with session.post(url, json=body, headers=headers) as response:
                    async for _ in response.content:
                        pass

        task = asyncio.create_task(long_request())
        await wait_for(lambda: r.hlen(f"{base(workload, 'acme')}:res") == 1, "the reservation")
        reserved = used(redis_url, workload, "acme")
        assert reserved >= 500  # prompt estimate + max_tokens
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(timeout=10)
        with pytest.raises(aiohttp.ClientError):
            await task
        # Killed: nobody settles it, and it stays charged until its lease ends.
        assert used(redis_url, workload, "acme") == reserved
        [leased] = r.zrange(f"{base(workload, 'acme')}:lease", 0, -1)

        sidecar = await start_sidecar(policy=policy_file)
        async with sdk(sidecar, "acme") as client:
            early = await client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=10)
            await settled(sidecar)
            assert early.usage is not None
            # Within the lease: still held.
            assert used(redis_url, workload, "acme") == reserved + early.usage.total_tokens
            await asyncio.sleep(2.2)
            late = await client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=10)
            await settled(sidecar)
        assert late.usage is not None
        # Released by that admission: the budget holds only what was served.
        assert used(redis_url, workload, "acme") == early.usage.total_tokens + late.usage.total_tokens
        assert r.hlen(f"{base(workload, 'acme')}:res") == 0
        assert r.zcard(f"{base(workload, 'acme')}:lease") == 0
        assert r.exists(f"{base(workload, 'acme')}:swept:{leased.decode()}")
        assert sample(sidecar, "tokenscaler_policy_reservations_expired_total", tenant="acme") == 1
    finally:
        if doomed.poll() is None:
            doomed.kill()
            doomed.wait(timeout=10)
        r.close()


async def test_a_request_longer_than_the_lease_keeps_its_reservation(
    start_sidecar: StartSidecar, upstream: FakeUpstream, policy_file: Path, workload: str, redis_url: str
) -> None:
    leased_policy(policy_file, workload)
    sidecar = await start_sidecar(policy=policy_file)
    async with sdk(sidecar, "acme") as client:

        async def long_stream() -> int:
            stream = await client.chat.completions.create(
                model="m",
                messages=MESSAGES,
                max_tokens=8,
                stream=True,
                extra_headers={"X-Fake-Delay": "0.5"},  # ~4 s, twice the lease
            )
            pieces = [chunk async for chunk in stream if chunk.choices and chunk.choices[0].delta.content]
            return len(pieces)

        task = asyncio.create_task(long_stream())
        for _ in range(6):  # admissions that would release it, were its lease not renewed
            await asyncio.sleep(0.6)
            await client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=1)
        assert await task == 8
        await settled(sidecar)
    assert sample(sidecar, "tokenscaler_policy_reservations_expired_total", tenant="acme") == 0
    assert used(redis_url, workload, "acme") == upstream.reported.prompt + upstream.reported.generation


async def test_a_settlement_after_the_release_charges_in_full_and_every_settlement_applies_once(
    redis_url: str, workload: str
) -> None:
    client = connect(redis_url)
    store = Store(Channel.from_url(redis_url))
    day, month = periods(time.time())
    keys = tenant_keys(scope(workload), "late", day, month, None)
    try:

        async def admit(id: str, lease_ms: int) -> Admitted:
            return await store.admit(
                keys, id=id, cost=100, day_limit=1000, month_limit=0, least=0, tokens=100,
                tenant_rate=(0.0, 0.0), model_rate=(0.0, 0.0), lease_ms=lease_ms, day=day, month=month,
            )  # fmt: skip

        def settle(id: str, cost: int, unreserved: bool = False) -> Item:
            args = settle_args(
                id=id, cost=cost, tokens=cost, daily=True, monthly=False,
                tenant_interval=0.0, model_interval=0.0, unreserved=unreserved,
            )  # fmt: skip
            return keys, args

        first = await admit("first", 50)
        assert (first.status, first.granted, first.day_used, first.expired) == (0, 100, 100, 0)
        await asyncio.sleep(0.1)
        second = await admit("second", 60_000)
        # The first reservation was released (refunded) before the second was counted.
        assert (second.day_used, second.expired) == (100, 1)
        late, on_time = await store.settle_many([settle("first", 70), settle("second", 40)])
        assert late.applied == 3 and on_time.applied == 1
        assert on_time.day_used == 70 + 40
        # Sent again (a lost reply): nothing more.
        [again] = await store.settle_many([settle("first", 70)])
        assert (again.applied, again.day_used) == (0, 110)
        # Admitted while Redis was away (no reservation): charged once, however often sent.
        sent = [settle("offline", 25, unreserved=True)] * 2
        charged, twice = await store.settle_many(sent)
        assert (charged.applied, charged.day_used) == (2, 135)
        assert (twice.applied, twice.day_used) == (0, 135)
        # Admitted without Redis though its admission did reach Redis (the reply was lost):
        # the reservation is settled to the real cost, and sending it again changes nothing.
        lost = await admit("lost", 60_000)
        assert lost.day_used == 235
        sent = [settle("lost", 30, unreserved=True)] * 2
        charged, twice = await store.settle_many(sent)
        assert (charged.applied, charged.day_used) == (1, 165)
        assert (twice.applied, twice.day_used) == (0, 165)
    finally:
        tenant = tenant_keys(scope(workload), "late", day, month, None).res[: -len(":res")]
        await client.delete(*keys, *[k async for k in client.scan_iter(f"{tenant}:*")])
        await client.aclose()


async def test_budget_periods_follow_redis_clock(redis_url: str, workload: str, tmp_path: Path) -> None:
    policy = write_policy(
        tmp_path / "policy.yaml", {"scope": scope(workload), "defaults": {"budget": {"daily": 10_000}}}
    )
    client = connect(redis_url)
    skewed = PolicyEngine(
        policy,
        Channel.from_url(redis_url),
        CollectorRegistry(),
        workload=workload,
        clock=Clock(wall=lambda: time.time() - 86_400 * 3),
    )
    body = json.dumps({"model": "m", "messages": MESSAGES, "max_tokens": 5}).encode()
    parsed = openai.parse_request(openai.Kind.CHAT, body)
    assert parsed is not None
    tenant = f"skewed-{uuid.uuid4().hex[:6]}"
    try:
        await skewed.tick()  # reads Redis' clock
        admission = await skewed.admit({"X-Tenant-ID": tenant}, parsed, body, 10)
        assert admission.rejection is None and admission.ticket is not None
        redis_now, _ = await client.time()
        assert admission.ticket.day == periods(redis_now)[0]
        skewed.settle(admission, 10, 5)
        await skewed.close(5)
        assert await client.get(f"{base(workload, tenant)}:budget:d:{periods(redis_now)[0]}") == b"15"
    finally:
        await client.delete(*[k async for k in client.scan_iter(f"{base(workload, tenant)}:*")])
        await client.aclose()


async def test_a_client_gone_during_admission_releases_and_outage_refusals_release_nothing(
    tmp_path: Path,
) -> None:
    from tests.token_scaler.test_redis_channel import FakeRedis

    policy = write_policy(
        tmp_path / "policy.yaml",
        {
            "redisTimeoutMs": 200,
            "modelLimits": {"m": {"tokensPerMinute": 600}},
            "defaults": {"budget": {"daily": 10_000}, "failMode": "closed"},
        },
    )
    fake = FakeRedis(silent={1})  # takes the admission, never answers
    channel = Channel(port=await fake.start())
    engine = PolicyEngine(policy, channel, CollectorRegistry(), workload="test/x")
    body = json.dumps({"model": "m", "messages": MESSAGES, "max_tokens": 5}).encode()
    parsed = openai.parse_request(openai.Kind.CHAT, body)
    assert parsed is not None
    try:
        admitting = asyncio.create_task(engine.admit({"X-Tenant-ID": "t"}, parsed, body, 10))
        await asyncio.sleep(0.05)
        admitting.cancel()  # the client went away while Redis decided
        with pytest.raises(asyncio.CancelledError):
            await admitting
        [release] = engine.settlements.pending
        assert (release.cost, release.tokens, release.moved) == (0, 0, True)
        # Redis does not answer: the admission times out (fail-closed: 503) and releases
        # what it may have reserved; the requests refused while it is marked away sent
        # nothing, and release nothing.
        refused = await engine.admit({"X-Tenant-ID": "t"}, parsed, body, 10)
        assert refused.rejection is not None and refused.rejection.status == 503
        assert len(engine.settlements.pending) == 2
        for _ in range(5):
            refused = await engine.admit({"X-Tenant-ID": "t"}, parsed, body, 10)
            assert refused.rejection is not None and refused.rejection.status == 503
        assert len(engine.settlements.pending) == 2
        assert all(s.moved for s in engine.settlements.pending)  # the model limit is never given back blind
    finally:
        await channel.close()
        await fake.stop()


async def test_a_settlement_redis_refuses_is_said_and_spoils_nothing_else(
    redis_url: str, workload: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    policy = write_policy(
        tmp_path / "policy.yaml", {"scope": scope(workload), "defaults": {"budget": {"daily": 10_000}}}
    )
    client = connect(redis_url)
    channel = Channel.from_url(redis_url)
    registry = CollectorRegistry()
    engine = PolicyEngine(policy, channel, registry, workload=workload)
    body = json.dumps({"model": "m", "messages": MESSAGES, "max_tokens": 5}).encode()
    parsed = openai.parse_request(openai.Kind.CHAT, body)
    assert parsed is not None
    try:
        good = await engine.admit({"X-Tenant-ID": "good"}, parsed, body, 10)
        bad = await engine.admit({"X-Tenant-ID": "bad"}, parsed, body, 10)
        assert good.ticket is not None and bad.ticket is not None
        day_key, good_key = bad.ticket.keys.day, good.ticket.keys.day
        await client.delete(day_key)
        await client.hset(day_key, "not", "a counter")  # the settlement's INCRBY fails
        engine.settle(good, 10, 3)
        engine.settle(bad, 10, 3)
        await engine.close(5)
        assert not engine.outage.down and not engine.settlements.pending
        assert await client.get(good_key) == b"13"
        errors = registry.get_sample_value("tokenscaler_policy_redis_errors_total", {"op": "settle_script"})
        assert errors == 1
        assert "Redis refused the settlement of a request of tenant bad" in caplog.text
    finally:
        await client.delete(
            *[k async for k in client.scan_iter(f"tokenscaler:v1:{{policy:{scope(workload)}:*")]
        )
        await channel.close()
        await client.aclose()


async def test_a_settlement_redis_refuses_for_now_waits_for_it(own_redis: LocalRedis, tmp_path: Path) -> None:
    policy = write_policy(tmp_path / "policy.yaml", {"defaults": {"budget": {"daily": 10_000}}})
    client = connect(own_redis.url)
    channel = Channel.from_url(own_redis.url)
    engine = PolicyEngine(policy, channel, CollectorRegistry(), workload="test/x")
    body = json.dumps({"model": "m", "messages": MESSAGES, "max_tokens": 5}).encode()
    parsed = openai.parse_request(openai.Kind.CHAT, body)
    assert parsed is not None
    try:
        admission = await engine.admit({"X-Tenant-ID": "t"}, parsed, body, 10)
        assert admission.ticket is not None
        day_key = admission.ticket.keys.day
        # A failover made this Redis a replica: writes, scripts' included, answer READONLY.
        await client.execute_command("REPLICAOF", "127.0.0.1", "1")
        engine.settle(admission, 10, 3)
        await engine.close(5)
        assert len(engine.settlements.pending) == 1  # kept, not dropped as a script fault
        assert engine.outage.down
        await client.execute_command("REPLICAOF", "NO", "ONE")
        await engine.tick()
        assert not engine.settlements.pending and await client.get(day_key) == b"13"
    finally:
        await channel.close()
        await client.aclose()
