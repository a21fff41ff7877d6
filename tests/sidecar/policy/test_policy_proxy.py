"""Policies through a real sidecar and a real Redis, seen by the openai SDK and raw HTTP."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import openai
import pytest
import redis
import yaml

from sidecar.policy.identity import key_digest
from sidecar.server import Sidecar
from tests.sidecar.conftest import StartSidecar, arrivals, read_records, scope, totals
from tests.sidecar.fake_upstream import FakeUpstream
from token_scaler.redis_conn import LocalRedis
from token_scaler.saturation import Saturation, saturation_key

MESSAGES = [{"role": "user", "content": "Say something long about tokens."}]


def write_policy(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(doc))
    return path


def sdk(sidecar: Sidecar, tenant: str | None = None, api_key: str = "k") -> openai.AsyncOpenAI:
    headers = {"X-Tenant-ID": tenant} if tenant else None
    return openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{sidecar.port}/v1",
        api_key=api_key,
        max_retries=0,
        default_headers=headers,
    )


def sample(sidecar: Sidecar, name: str, **labels: str) -> float:
    return sidecar.registry.get_sample_value(name, labels) or 0.0


async def settled(sidecar: Sidecar) -> None:
    """Wait for the settlements in flight (they run after the response)."""
    assert sidecar.policy is not None
    for _ in range(200):
        if not sidecar.policy.settling:
            return
        await asyncio.sleep(0.005)
    raise AssertionError("settlements never finished")


async def test_caps_default_clamp_and_reject_seen_by_the_sdk(
    start_sidecar: StartSidecar, upstream: FakeUpstream, policy_file: Path, workload: str
) -> None:
    write_policy(
        policy_file,
        {
            "scope": scope(workload),
            "defaults": {"maxTokens": {"default": 64, "ceiling": 100}},
            "tenants": {
                "strict": {"maxTokens": {"overCeiling": "reject"}},
                "big": {"maxTokens": {"ceiling": 4096}},
            },
        },
    )
    sidecar = await start_sidecar(policy=policy_file)
    async with sdk(sidecar, "anyone") as client:
        raw = await client.chat.completions.with_raw_response.create(model="m", messages=MESSAGES)
        chat = raw.parse()
        assert chat.usage is not None and chat.usage.completion_tokens == 64
        assert raw.headers["x-tokenscaler-max-tokens"] == "64; action=default; requested=none"
        raw = await client.chat.completions.with_raw_response.create(
            model="m", messages=MESSAGES, max_completion_tokens=500
        )
        assert raw.parse().usage.completion_tokens == 100
        assert raw.headers["x-tokenscaler-max-tokens"] == "100; action=clamped; requested=500"
        raw = await client.chat.completions.with_raw_response.create(
            model="m", messages=MESSAGES, max_tokens=10
        )
        assert "x-tokenscaler-max-tokens" not in raw.headers
        stream = await client.completions.create(model="m", prompt="hi", max_tokens=900, stream=True)
        pieces = [c async for c in stream if c.choices and c.choices[0].text]
        assert len(pieces) == 100
    async with sdk(sidecar, "strict") as client:
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=101)
        assert info.value.code == "max_tokens_above_ceiling" and "ceiling of 100" in info.value.message
    async with sdk(sidecar, "big") as client:
        chat = await client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=3000)
        assert chat.usage is not None and chat.usage.completion_tokens == 3000
    # The upstream got the clamped body; the one the client sent unclamped is unchanged.
    sent = [body for _m, _p, _h, body in upstream.requests]
    assert b'"max_completion_tokens":100' in sent[1] and b'"max_tokens":10' in sent[2]
    assert sample(sidecar, "tokenscaler_policy_clamps_total", tenant="anyone", action="clamped") == 2
    assert sample(sidecar, "tokenscaler_policy_rejections_total", tenant="strict", reason="max_tokens") == 1


def used(redis_url: str, workload: str, tenant: str, period: str = "d") -> int:
    """What the tenant's budget keys of this period hold in Redis."""
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(
            client.scan_iter(match=f"tokenscaler:v1:{{policy:{scope(workload)}:{tenant}}}:budget:{period}:*")
        )
        return sum(int(client.get(k) or 0) for k in keys)
    finally:
        client.close()


async def test_budget_reserves_settles_refunds_and_refuses(
    start_sidecar: StartSidecar, upstream: FakeUpstream, policy_file: Path, workload: str, redis_url: str
) -> None:
    write_policy(
        policy_file,
        {"scope": scope(workload), "defaults": {"budget": {"daily": 600, "monthly": 100_000}}},
    )
    sidecar = await start_sidecar(policy=policy_file)
    async with sdk(sidecar, "acme") as client:
        # A failed request costs nothing: its reservation is released.
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(
                model="m", messages=MESSAGES, max_tokens=50, extra_headers={"X-Fake-Fail": "500"}
            )
        await settled(sidecar)
        assert used(redis_url, workload, "acme") == 0
        served = 0
        with pytest.raises(openai.RateLimitError) as info:
            for _ in range(100):
                chat = await client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=50)
                assert chat.usage is not None
                served += chat.usage.total_tokens
                await settled(sidecar)
        assert info.value.code == "budget_exceeded" and "daily tokens budget" in info.value.message
        assert int(info.value.response.headers["Retry-After"]) <= 86_400
    await settled(sidecar)
    # Settled to the real usage: what Redis holds is exactly what the model server reported.
    assert served == upstream.reported.prompt + upstream.reported.generation
    assert used(redis_url, workload, "acme") == used(redis_url, workload, "acme", "m") == served
    # Refused once a whole reservation (12 + 50) no longer fits; past the limit by at most the
    # last request's error of estimate (the fake's prompt is 17 tokens, estimated 12).
    assert 600 - 62 < served <= 600 + 5
    assert sample(sidecar, "tokenscaler_budget_used_ratio", tenant="acme") == pytest.approx(served / 600)
    assert sample(sidecar, "tokenscaler_policy_rejections_total", tenant="acme", reason="budget") == 1


async def test_shortfall_shortens_and_a_stream_past_its_reservation_ends_cleanly(
    start_sidecar: StartSidecar, upstream: FakeUpstream, policy_file: Path, workload: str, redis_url: str
) -> None:
    write_policy(
        policy_file,
        {
            "scope": scope(workload),
            "defaults": {"budget": {"daily": 200, "onShortfall": "shorten", "minTokens": 5}},
            "tenants": {"calm": {"budget": {"midStream": "finish"}}},
        },
    )
    sidecar = await start_sidecar(policy=policy_file)
    async with sdk(sidecar, "acme") as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="m", messages=MESSAGES, max_tokens=500
        )
        # 200 left, the prompt estimate takes 12 of them: max_tokens shortened to what is left.
        assert raw.headers["x-tokenscaler-max-tokens"] == "188; action=budget; requested=500"
    async with sdk(sidecar, "greedy") as client:
        # A server that ignores max_tokens (X-Fake-Tokens): the stream ends at the reservation.
        stream = await client.chat.completions.create(
            model="m", messages=MESSAGES, max_tokens=20, stream=True, extra_headers={"X-Fake-Tokens": "80"}
        )
        pieces = 0
        with pytest.raises(openai.APIError) as info:
            async for chunk in stream:
                pieces += bool(chunk.choices and chunk.choices[0].delta.content)
        assert pieces == 20 and "budget" in info.value.message
    async with sdk(sidecar, "calm") as client:
        stream = await client.chat.completions.create(
            model="m", messages=MESSAGES, max_tokens=20, stream=True, extra_headers={"X-Fake-Tokens": "80"}
        )
        chunks = [c async for c in stream]
        assert sum(bool(c.choices and c.choices[0].delta.content) for c in chunks) == 20
        assert chunks[-1].choices[0].finish_reason == "length"
    await settled(sidecar)
    assert used(redis_url, workload, "greedy") == 12 + 20  # the prompt estimate and what was streamed
    assert sample(sidecar, "tokenscaler_policy_stream_cuts_total", tenant="greedy") == 1


async def test_rate_limit_headers_and_429(
    start_sidecar: StartSidecar, policy_file: Path, workload: str
) -> None:
    write_policy(
        policy_file,
        {
            "scope": scope(workload),
            "defaults": {"rateLimit": {"tokensPerMinute": 6000, "burstSeconds": 1, "perModel": {"big": 600}}},
        },
    )
    sidecar = await start_sidecar(policy=policy_file)
    async with sdk(sidecar, "acme") as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="m", messages=MESSAGES, max_tokens=20
        )
        assert raw.headers["x-ratelimit-limit-tokens"] == "6000"
        assert 0 < int(raw.headers["x-ratelimit-remaining-tokens"]) <= 100 - 32
        assert raw.headers["x-ratelimit-reset-tokens"].endswith("ms")
        # 100 tokens of burst: a second request of 32 fits, a third of 80 does not.
        await client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=20)
        with pytest.raises(openai.RateLimitError) as info:
            await client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=68)
        headers = info.value.response.headers
        assert info.value.code == "rate_limit_exceeded" and headers["Retry-After"] == "1"
        assert 0 < int(headers["retry-after-ms"]) <= 1000 and headers["x-ratelimit-remaining-tokens"] == "0"
    async with sdk(sidecar, "solo") as client:
        # The per-model limit (600/min, 10 tokens of burst): a request larger than the burst
        # passes only when the limit is full, so the second one waits for the first's 18 real
        # tokens (13 reserved, corrected at settlement) to drain: 1.8 s.
        await client.chat.completions.create(model="big", messages=MESSAGES, max_tokens=1)
        await settled(sidecar)
        with pytest.raises(openai.RateLimitError) as info:
            await client.chat.completions.create(model="big", messages=MESSAGES, max_tokens=1)
        assert "model big" in info.value.message
        assert 1300 < int(info.value.response.headers["retry-after-ms"]) <= 1800
    assert sample(sidecar, "tokenscaler_policy_rejections_total", tenant="acme", reason="rate_limit") == 1


async def test_downgrade_on_budget_share_triggers_and_recovers(
    start_sidecar: StartSidecar, policy_file: Path, workload: str, redis_url: str
) -> None:
    write_policy(
        policy_file,
        {
            "scope": scope(workload),
            "downgrade": {"large": {"to": "small", "atBudgetRatio": 0.5}},
            "defaults": {
                "budget": {"daily": 1000},
                "softCaps": [{"atBudgetRatio": 0.3, "maxTokens": 40}],
            },
            "tenants": {"vip": {"keepModel": True}},
        },
    )
    sidecar = await start_sidecar(policy=policy_file)
    models = []
    for tenant in ("acme", "vip"):
        async with sdk(sidecar, tenant) as client:
            for _ in range(7):
                raw = await client.chat.completions.with_raw_response.create(
                    model="large", messages=MESSAGES, max_tokens=150
                )
                models.append((tenant, raw.parse().model, raw.headers.get("x-tokenscaler-max-tokens")))
                await settled(sidecar)
    # acme used 167, 334 (the soft cap from here: 40 tokens), 391, 448, 505: then the cheaper model.
    assert [m[1] for m in models[:7]] == ["large"] * 5 + ["small"] * 2
    assert models[2][2] == "40; action=soft-cap; requested=150"
    assert {m[1] for m in models[7:]} == {"large"}  # whitelisted
    assert sample(
        sidecar, "tokenscaler_policy_downgrades_total", tenant="acme", model="small", reason="budget"
    )
    # A new day (the budget key gone): the next reply shows the share back at 0, and the model returns.
    client_r = redis.Redis.from_url(redis_url)
    client_r.delete(*client_r.keys(f"tokenscaler:v1:{{policy:{scope(workload)}:acme}}:budget:*"))
    client_r.close()
    async with sdk(sidecar, "acme") as client:
        first = await client.chat.completions.create(model="large", messages=MESSAGES, max_tokens=10)
        await settled(sidecar)
        second = await client.chat.completions.create(model="large", messages=MESSAGES, max_tokens=10)
    assert (first.model, second.model) == ("small", "large")


async def test_downgrade_when_the_scaler_reports_saturation(
    start_sidecar: StartSidecar, upstream: FakeUpstream, policy_file: Path, workload: str, redis_url: str
) -> None:
    cheap = FakeUpstream()
    await cheap.start()
    try:
        write_policy(
            policy_file,
            {
                "scope": scope(workload),
                "downgrade": {
                    "large": {
                        "to": "small",
                        "upstream": f"http://127.0.0.1:{cheap.port}",
                        "whenSaturated": True,
                    }
                },
            },
        )
        sidecar = await start_sidecar(policy=policy_file)
        assert sidecar.policy is not None
        client_r = redis.Redis.from_url(redis_url)
        seen = []
        async with sdk(sidecar, "acme") as client:
            for state in (False, True, False):
                ts = client_r.time()
                signal = Saturation(
                    state, "max-replicas" if state else "", 12, 10, ts[0] * 1000 + ts[1] // 1000
                )
                client_r.set(saturation_key(workload), signal.encode(), px=30_000)
                await sidecar.policy.tick()
                raw = await client.chat.completions.with_raw_response.create(
                    model="large", messages=MESSAGES, max_tokens=5
                )
                seen.append((raw.parse().model, raw.headers.get("x-tokenscaler-model")))
        client_r.close()
        assert seen == [
            ("large", None),
            ("small", "small; from=large; reason=saturated"),
            ("large", None),
        ]
        assert len(cheap.requests) == 1 and len(upstream.requests) == 2
        # The cheaper server's tokens are its own workload's demand, not this one's.
        sidecar.flusher.tick()
        assert await sidecar.flusher.deliver()
        records = read_records(redis_url, workload)
        assert totals(records)["rq"] == arrivals(records) == 2
    finally:
        await cheap.stop()


async def test_api_keys_choose_the_tenant_and_the_header_is_ignored(
    start_sidecar: StartSidecar, policy_file: Path, workload: str
) -> None:
    write_policy(
        policy_file,
        {
            "scope": scope(workload),
            "identity": {"apiKeys": {key_digest("sk-acme"): "acme"}, "defaultTenant": "anon"},
            "defaults": {"maxTokens": {"ceiling": 10}},
            "tenants": {"acme": {"maxTokens": {"ceiling": 30}}, "other": {"maxTokens": {"ceiling": 500}}},
        },
    )
    sidecar = await start_sidecar(policy=policy_file)
    results = {}
    for key, header in (("sk-acme", None), ("sk-unknown", "other"), ("sk-acme", "other")):
        async with sdk(sidecar, header, api_key=key) as client:
            chat = await client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=100)
            assert chat.usage is not None
            results[(key, header)] = chat.usage.completion_tokens
    assert results == {("sk-acme", None): 30, ("sk-unknown", "other"): 10, ("sk-acme", "other"): 30}
    assert sample(sidecar, "tokenscaler_policy_clamps_total", tenant="anon", action="clamped") == 1


async def test_reload_applies_a_good_file_and_keeps_the_policy_on_a_bad_one(
    start_sidecar: StartSidecar, policy_file: Path, workload: str, caplog: pytest.LogCaptureFixture
) -> None:
    write_policy(policy_file, {"scope": scope(workload), "defaults": {"maxTokens": {"ceiling": 10}}})
    sidecar = await start_sidecar(policy=policy_file)
    assert sidecar.policy is not None

    async def completion_tokens() -> int:
        async with sdk(sidecar, "acme") as client:
            chat = await client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=100)
            assert chat.usage is not None
            return chat.usage.completion_tokens

    assert await completion_tokens() == 10
    write_policy(policy_file, {"scope": scope(workload), "defaults": {"maxTokens": {"ceiling": 20}}})
    await sidecar.policy.tick()
    assert await completion_tokens() == 20
    policy_file.write_text("defaults:\n  maxTokens:\n    ceiling: lots\n")  # noqa: ASYNC240
    await sidecar.policy.tick()
    assert await completion_tokens() == 20
    assert "defaults.maxTokens.ceiling" in caplog.text
    assert sample(sidecar, "tokenscaler_policy_reloads_total", result="error") == 1
    assert sample(sidecar, "tokenscaler_policy_reloads_total", result="ok") == 1


@pytest.mark.parametrize("mode", ["open", "closed"])
async def test_redis_outage_fail_open_reconciles_fail_closed_refuses(
    start_sidecar: StartSidecar, upstream: FakeUpstream, tmp_path: Path, own_redis: LocalRedis, mode: str
) -> None:
    policy_file = write_policy(
        tmp_path / "policy.yaml",
        {"redisTimeoutMs": 200, "defaults": {"budget": {"daily": 10_000}, "failMode": mode}},
    )
    sidecar = await start_sidecar(policy=policy_file, redis_url=own_redis.url)
    assert sidecar.policy is not None
    async with sdk(sidecar, "acme") as client:
        await client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=10)
        await settled(sidecar)
        before = used(own_redis.url, "default/x", "acme")
        port = own_redis.port
        own_redis.process.terminate()
        own_redis.process.wait()
        outcomes = []
        for _ in range(3):
            try:
                chat = await client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=10)
                assert chat.usage is not None
                outcomes.append(chat.usage.total_tokens)
            except openai.InternalServerError as exc:
                outcomes.append(exc.status_code)
        await settled(sidecar)
        restarted = LocalRedis.start(port=port)
        try:
            await sidecar.policy.tick()  # Redis answers again: the queue goes out
            after = used(restarted.url, "default/x", "acme")
        finally:
            restarted.stop()
    if mode == "closed":
        assert outcomes == [503, 503, 503]
        assert after == 0  # a fresh Redis: nothing was charged while it was away
    else:
        assert len(outcomes) == 3 and all(o > 20 for o in outcomes)
        assert after == sum(outcomes)  # the fresh Redis holds the usage admitted without it
        assert sample(sidecar, "tokenscaler_policy_unchecked_requests_total", tenant="acme") == 3
    assert before > 0 and not sidecar.policy.settlements.pending


async def test_rate_limits_hold_while_redis_is_away_each_sidecar_its_share(
    start_sidecar: StartSidecar, tmp_path: Path, own_redis: LocalRedis
) -> None:
    # 600 tokens/min with a 5 s burst; a request reserves 22 tokens (prompt estimate 12 +
    # max_tokens 10) and uses 27. Alone, a sidecar's local limit is the whole limit: 2
    # requests in a row fit (2 x 22 x 100 ms + the correction to 27 < 5 s), a third does not.
    # With two sidecars announced each has half: 1 request each.
    def policy(scope: str) -> Path:
        limits = {"rateLimit": {"tokensPerMinute": 600, "burstSeconds": 5}, "failMode": "open"}
        return write_policy(
            tmp_path / f"{scope}.yaml", {"scope": scope, "redisTimeoutMs": 200, "defaults": limits}
        )

    alone = await start_sidecar(policy=policy("solo"), redis_url=own_redis.url)
    pair = [await start_sidecar(policy=policy("pair"), redis_url=own_redis.url) for _ in range(2)]
    for sidecar in (alone, *pair, pair[0]):  # pair[0] again: learns of pair[1]
        assert sidecar.policy is not None
        await sidecar.policy.tick()
        await sidecar.policy.presence.announce()  # learns how many share the limits
    own_redis.process.terminate()
    own_redis.process.wait()

    async def burst(sidecar: Sidecar, tenant: str) -> list[int]:
        outcomes = []
        async with sdk(sidecar, tenant) as client:
            for _ in range(3):
                try:
                    await client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=10)
                    outcomes.append(200)
                except openai.RateLimitError as exc:
                    assert exc.code == "rate_limit_exceeded"
                    assert int(exc.response.headers["Retry-After"]) >= 1
                    outcomes.append(429)
                await settled(sidecar)
        return outcomes

    assert alone.policy.presence.peers == 1
    assert await burst(alone, "a") == [200, 200, 429]
    for sidecar in pair:
        assert sidecar.policy is not None and sidecar.policy.presence.peers == 2
        assert await burst(sidecar, "b") == [200, 429, 429]
    assert sample(pair[0], "tokenscaler_policy_rejections_total", tenant="b", reason="rate_limit") == 2


async def test_a_model_limit_across_tenants_refuses_and_gives_back(
    start_sidecar: StartSidecar, policy_file: Path, workload: str, redis_url: str
) -> None:
    # 600 tokens/min for model m, whoever asks, 5 s of burst: 100 ms per token. A request
    # reserves 22 tokens (2.2 s) and uses 27 (2.7 s once settled): two fit, the third not.
    write_policy(
        policy_file,
        {
            "scope": scope(workload),
            "modelLimits": {"m": {"tokensPerMinute": 600, "burstSeconds": 5}},
            "tenants": {"rich": {"budget": {"daily": 10_000}}, "poor": {"budget": {"daily": 5}}},
        },
    )
    sidecar = await start_sidecar(policy=policy_file)
    wide = f"tokenscaler:v1:{{policy:{scope(workload)}/model/m}}:rate"
    r = redis.Redis.from_url(redis_url)
    try:
        # Refused by its budget: what it took from the model's limit is given back.
        async with sdk(sidecar, "poor") as client:
            with pytest.raises(openai.RateLimitError) as info:
                await client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=10)
            assert info.value.code == "budget_exceeded"
        for _ in range(100):
            if r.pttl(wide) < 0:
                break
            await asyncio.sleep(0.02)
        assert r.pttl(wide) < 0  # nothing owed
        served = []
        for tenant in ("a", "b"):
            async with sdk(sidecar, tenant) as client:
                raw = await client.chat.completions.with_raw_response.create(
                    model="m", messages=MESSAGES, max_tokens=10
                )
                served.append(raw.parse())
                assert raw.headers["x-ratelimit-limit-tokens"] == "600"
                await settled(sidecar)
        # Settled to the real usage (27 tokens each): 5.4 s owed, less the time gone by.
        assert 4_700 < r.pttl(wide) <= 5_401  # uncorrected it would be 4.4 s
        async with sdk(sidecar, "rich") as client:
            with pytest.raises(openai.RateLimitError) as info:
                await client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=10)
            assert "model m (all tenants)" in info.value.message
            assert int(info.value.response.headers["Retry-After"]) >= 1
            # Another model is not limited.
            await client.chat.completions.create(model="other", messages=MESSAGES, max_tokens=10)
        await settled(sidecar)
        await asyncio.sleep(0.05)
        # The refused request's budget reservation was released: only "other" is charged.
        assert used(redis_url, workload, "rich") == 27
        assert r.hlen(f"tokenscaler:v1:{{policy:{scope(workload)}:rich}}:res") == 0
        assert sample(sidecar, "tokenscaler_policy_rejections_total", tenant="rich", reason="rate_limit") == 1
    finally:
        r.delete(wide)
        r.close()


async def test_a_reservation_redis_lost_is_charged_without_it_once(
    start_sidecar: StartSidecar, upstream: FakeUpstream, policy_file: Path, workload: str, redis_url: str
) -> None:
    """A failover to a replica that missed the admission (or a restart without persistence)
    loses the reservation: the request's real usage is charged when it ends, once."""
    write_policy(policy_file, {"scope": scope(workload), "defaults": {"budget": {"daily": 100_000}}})
    sidecar = await start_sidecar(policy=policy_file)
    client = redis.Redis.from_url(redis_url)
    key = f"tokenscaler:v1:{{policy:{scope(workload)}:acme}}"
    try:
        async with sdk(sidecar, "acme") as api:
            streamed = await api.chat.completions.create(
                model="m",
                messages=MESSAGES,
                max_tokens=20,
                stream=True,
                extra_headers={"X-Fake-Delay": "0.05"},
            )
            first = True
            async for _chunk in streamed:
                if first:  # admitted and reserved: Redis forgets it all, as a failover would
                    assert client.hlen(f"{key}:res") == 1
                    for stale in client.scan_iter(match=f"{key}:*"):
                        client.delete(stale)
                    first = False
        told = upstream.reported.prompt + upstream.reported.generation
        await settled(sidecar)
        for _ in range(100):  # the charge without a reservation is a settlement of its own
            if used(redis_url, workload, "acme") == told:
                break
            await asyncio.sleep(0.02)
            await settled(sidecar)
        assert used(redis_url, workload, "acme") == told
        assert client.hlen(f"{key}:res") == 0
        assert sample(sidecar, "tokenscaler_policy_redis_errors_total", op="reservation_lost") == 1
    finally:
        client.close()
