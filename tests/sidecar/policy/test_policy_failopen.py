"""Fail-open only when Redis is the problem, and within a bounded share of the budget."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import openai
import pytest
from prometheus_client import CollectorRegistry

from sidecar import openai as openai_api
from sidecar.policy import admission, failopen
from sidecar.policy.clock import Clock
from sidecar.policy.context import Context
from sidecar.policy.metrics import PolicyMetrics
from sidecar.policy.policyfile import PolicyFile
from sidecar.policy.schema import Budget, parse
from sidecar.policy.store import Store
from sidecar.policy.tickets import Ticket
from sidecar.policy.usage import Usage
from tests.sidecar.conftest import StartSidecar
from tests.sidecar.policy.test_policy_proxy import MESSAGES, sample, sdk, settled, used, write_policy
from token_scaler.redis_channel import Channel
from token_scaler.redis_conn import LocalRedis

PARSED = openai_api.parse_request(
    openai_api.Kind.CHAT, b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}'
)
assert PARSED is not None


async def test_a_stalled_loop_does_not_time_a_call_out_but_a_slow_reply_does() -> None:
    loop = asyncio.get_running_loop()
    guard = failopen.Guard()
    try:
        # The reply is due 60 ms in, the deadline at 100 ms; the loop is held from 50 to 350 ms:
        # both are overdue when it runs again. The wait was 350 ms, the round trip 60.
        reply: asyncio.Future[str] = loop.create_future()
        loop.call_later(0.05, time.sleep, 0.3)
        loop.call_later(0.06, reply.set_result, "ok")
        async with guard.round_trip(0.1):
            assert await reply == "ok"
        # The same with asyncio's timeout: the overdue deadline wins.
        reply = loop.create_future()
        loop.call_later(0.05, time.sleep, 0.3)
        loop.call_later(0.06, reply.set_result, "ok")
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.1):
                await reply
        assert guard.excuses(TimeoutError(), 1.0)  # the stall is remembered for background calls
        # A reply that does not come while the loop runs is a timeout.
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            async with guard.round_trip(0.1):
                await loop.create_future()
        assert time.monotonic() - started < 1.0
        assert not guard.excuses(ConnectionError(), 1.0)
    finally:
        guard.stop()


def test_fail_open_admits_within_its_share_of_what_was_left() -> None:
    budget = Budget(daily=1000, monthly=0)
    assert failopen.fits_share(budget, None, 0, 1000, 1)
    assert not failopen.fits_share(budget, None, 0, 1001, 1)  # more than the whole budget
    assert not failopen.fits_share(budget, (900, 900), 0, 101, 1)
    assert failopen.fits_share(budget, (400, 400), 200, 100, 2)  # 300 of the 600 left, each
    assert not failopen.fits_share(budget, (400, 400), 250, 100, 2)


def test_without_redis_each_sidecar_spends_its_share_and_keeps_it_local(tmp_path: Path) -> None:
    """``Outage.admit`` alone: what was last seen of the budget, this sidecar's share of it."""
    path = write_policy(
        tmp_path / "policy.yaml",
        {"defaults": {"budget": {"daily": 1000}, "rateLimit": {"tokensPerMinute": 600, "burstSeconds": 1}}},
    )
    registry = CollectorRegistry()
    metrics = PolicyMetrics(registry)
    file = PolicyFile(path)
    outage = failopen.Outage(Context(Store(Channel.from_url("redis://127.0.0.1:1")), metrics, file, Clock()))
    usage = Usage(metrics, str, lambda tenant: 0)
    policy, now = file.policy, 1_767_225_600.0
    decision = admission.decide(policy, policy.tenant("t"), PARSED, 0.0, False)

    def ticket(cost: int) -> Ticket:
        plan = admission.reservation(policy, decision, "t", 1, cost - 16, now, "x")  # maxTokens 16
        return plan.ticket

    seen = ticket(20)
    usage.saw(seen, 600, 600)  # 400 left: 200 each for 2 sidecars
    first = ticket(150)
    assert outage.admit(policy.tenant("t"), first, "m", usage, 2, now) is None
    assert not first.reserved and outage.local("t") == 150
    over = outage.admit(policy.tenant("t"), ticket(60), "m", usage, 2, now)
    assert over is not None and over.reason == "budget"
    outage.forget("t", 150)  # Redis took it
    assert outage.local("t") == 0
    closed = parse({"defaults": {"budget": {"daily": 1000}, "failMode": "closed"}}).tenant("t")
    refused = outage.admit(closed, ticket(10), "m", usage, 1, now)
    assert refused is not None and refused.status == 503 and refused.reason == "redis_unavailable"


async def test_fail_open_refuses_a_request_larger_than_the_budget_and_bounds_the_spend(
    start_sidecar: StartSidecar, tmp_path: Path, own_redis: LocalRedis
) -> None:
    policy_file = write_policy(
        tmp_path / "policy.yaml",
        {
            "redisTimeoutMs": 200,
            "reservationChunks": {"seconds": 0},
            "defaults": {"budget": {"daily": 1000}, "failMode": "open"},
        },
    )
    sidecar = await start_sidecar(policy=policy_file, redis_url=own_redis.url)
    assert sidecar.policy is not None
    own_redis.process.terminate()
    own_redis.process.wait()
    served = 0
    async with sdk(sidecar, "acme") as client:
        # A prompt estimated at 2,000 tokens, twice the whole budget.
        huge = [{"role": "user", "content": "x" * 8000}]
        with pytest.raises(openai.RateLimitError) as info:
            await client.chat.completions.create(model="m", messages=huge, max_tokens=10)
        assert info.value.code == "budget_exceeded"
        refused = False
        for _ in range(20):
            try:
                chat = await client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=100)
            except openai.RateLimitError:
                refused = True
                break
            assert chat.usage is not None
            served += chat.usage.total_tokens
            await settled(sidecar)
    # Each request reserves 112 (prompt estimate 12 + 100) and uses 117: admitted while what this
    # sidecar admitted without Redis plus the next reservation fits the 1000 left.
    assert refused and 1000 - 117 < served <= 1000 + 5 * 8
    assert sample(sidecar, "tokenscaler_policy_rejections_total", tenant="acme", reason="budget") == 2
    restarted = LocalRedis.start(port=own_redis.port)
    try:
        await sidecar.policy.tick()
        assert used(restarted.url, "default/x", "acme") == served  # reconciled
    finally:
        restarted.stop()


async def test_a_stall_during_an_admission_is_not_taken_for_redis_failing(
    start_sidecar: StartSidecar, policy_file: Path, workload: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_policy(
        policy_file,
        {
            "scope": workload.split("/")[0],
            "redisTimeoutMs": 100,
            "reservationChunks": {"seconds": 0},
            "defaults": {"budget": {"daily": 100_000}, "failMode": "open"},
        },
    )
    sidecar = await start_sidecar(policy=policy_file)
    engine = sidecar.policy
    assert engine is not None
    ask = engine.reserver.ask

    async def held_while_asking(*args: object, **kwargs: object) -> object:
        # The loop is held 400 ms (a large body parsed on it, say) once the admission's 100 ms
        # deadline is running: the deadline passes while nothing else could run.
        time.sleep(0.4)  # noqa: ASYNC251 - the stall is the point
        return await ask(*args, **kwargs)

    monkeypatch.setattr(engine.reserver, "ask", held_while_asking)
    async with sdk(sidecar, "acme") as client:
        await client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=10)
    assert sample(sidecar, "tokenscaler_policy_admissions_total", path="redis") == 1
    assert sample(sidecar, "tokenscaler_policy_admissions_total", path="without_redis") == 0
    assert sample(sidecar, "tokenscaler_policy_redis_errors_total", op="admit") == 0
    assert not engine.outage.down
