"""The spend guard across four sidecar processes under concurrent load, seen by the openai SDK.

Real processes (``token-scaler sidecar --policy``), a real Redis, a fake model server process.
The sidecars learn each other's spend only through Redis, once a tick. Checked:
- every sidecar flips on its own from the large model to the downgrade at ``atSpendRatio``,
  then to refusing at 100 %, and never back within the hour;
- the scope's spend in Redis is exactly the real usage the clients were told, priced at the
  model that served each request: nothing dropped, nothing counted twice;
- a ``keepModel`` tenant is still served the large model at 100 %.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import openai
import pytest

from tests.sidecar.policy.test_policy_many import SIDECARS, Fleet, running_fleet
from token_scaler.record import KEY_PREFIX
from token_scaler.redis_conn import sync_client

PRICES = {"big": (1_000_000, 2_000_000), "small": (1_000_000, 1_000_000)}  # billionths per 1k tokens
PER_HOUR = 0.1  # money: 100,000,000 billionths
AT = 0.8
WORKERS_PER_SIDECAR = 2
PAUSE_S = 0.1  # between a worker's requests: the load spans several of the sidecars' ticks
MESSAGES = [{"role": "user", "content": "Say something long about tokens."}]


def cost(model: str, prompt: int, generation: int) -> int:
    p, g = PRICES[model]
    return -(-(prompt * p + generation * g) // 1000)


@dataclass
class Seen:
    """What one sidecar's clients saw, in order: (status, model served, downgrade reason)."""

    answers: list[tuple[int, str, str]] = field(default_factory=list)
    spent: int = 0  # priced usage the clients were told


@pytest.fixture(scope="module")
def guarded_fleet(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    doc = {
        "scope": f"spend-{uuid.uuid4().hex[:8]}",
        "prices": {"big": {"prompt": 0.001, "generation": 0.002}, "small": 0.001},
        "downgrade": {"big": {"to": "small"}},
        "spendGuard": {"perHour": PER_HOUR, "atSpendRatio": AT},
        "tenants": {"vip": {"keepModel": True}},
    }
    with running_fleet(redis_url, tmp_path_factory.mktemp("spend"), doc) as started:
        yield started


async def _worker(client: openai.AsyncOpenAI, seen: Seen) -> None:
    refusals = 0
    for _ in range(2000):
        if refusals >= 3:
            return
        try:
            raw = await client.chat.completions.with_raw_response.create(
                model="big", messages=MESSAGES, max_tokens=100
            )
        except openai.RateLimitError as exc:
            assert exc.code == "spend_limit_reached", exc
            seen.answers.append((429, "", ""))
            refusals += 1
        else:
            refusals = 0
            reply = raw.parse()
            assert reply.usage is not None
            seen.spent += cost(reply.model, reply.usage.prompt_tokens, reply.usage.completion_tokens)
            header = raw.headers.get("x-tokenscaler-model") or ""
            seen.answers.append((200, reply.model, header.rpartition("reason=")[2]))
        await asyncio.sleep(PAUSE_S)
    raise AssertionError("the spend guard never refused")


def _hours(fleet: Fleet) -> dict[str, int]:
    client = sync_client(fleet.redis_url)
    try:
        keys = client.scan_iter(match=f"{KEY_PREFIX}:{{policy:{fleet.scope}/spend}}:h:*")
        return {k.decode().rsplit(":", 1)[1]: int(client.get(k) or 0) for k in keys}
    finally:
        client.close()


async def test_spend_guard_across_four_sidecar_processes_flips_and_counts_exactly(
    guarded_fleet: Fleet,
) -> None:
    fleet = guarded_fleet
    seen = [Seen() for _ in fleet.urls]
    clients = [
        openai.AsyncOpenAI(
            base_url=f"{url}/v1", api_key="k", max_retries=0, default_headers={"X-Tenant-ID": tenant}
        )
        for url in fleet.urls
        for tenant in ("t", "vip")
    ]
    try:
        await asyncio.gather(
            *(
                _worker(clients[2 * i], seen[i])
                for i in range(len(fleet.urls))
                for _ in range(WORKERS_PER_SIDECAR)
            )
        )
        for i in range(SIDECARS):  # whitelisted: the large model at 100 %
            raw = await clients[2 * i + 1].chat.completions.with_raw_response.create(
                model="big", messages=MESSAGES, max_tokens=100
            )
            reply = raw.parse()
            assert reply.model == "big" and "x-tokenscaler-model" not in raw.headers
            assert reply.usage is not None
            seen[i].spent += cost("big", reply.usage.prompt_tokens, reply.usage.completion_tokens)
    finally:
        for client in clients:
            await client.close()
    told = sum(s.spent for s in seen)
    hours = _hours(fleet)
    for _ in range(100):  # each sidecar sends what it counted once a tick
        if sum(hours.values()) == told:
            break
        await asyncio.sleep(0.1)
        hours = _hours(fleet)
    assert sum(hours.values()) == told, (hours, told)
    per_hour = round(PER_HOUR * 1e9)
    print(
        f"\nspend guard, 4 sidecars: {told / per_hour:.1%} of the hourly budget spent, "
        + ", ".join(
            f"sidecar {i}: {sum(a[1] == 'big' for a in s.answers)} big, "
            f"{sum(a[2] == 'spend' for a in s.answers)} downgraded, "
            f"{sum(a[0] == 429 for a in s.answers)} refused"
            for i, s in enumerate(seen)
        )
    )
    assert told >= per_hour
    for s in seen:
        phases = [0 if model == "big" else 1 if reason == "spend" else 2 for _, model, reason in s.answers]
        assert 1 in phases and phases[-1] == 2
        if len(hours) == 1:  # within one hour, a sidecar never goes back
            assert phases == sorted(phases)
    labels = f'action="spend_refuse_all",model="",scope="{fleet.scope}"'
    assert fleet.total("tokenscaler_policy_action_in_force", labels) == SIDECARS
    assert fleet.total("tokenscaler_policy_spend_ratio", f'scope="{fleet.scope}"') >= SIDECARS * 1.0
