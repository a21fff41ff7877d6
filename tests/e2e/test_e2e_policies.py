"""End to end: the ``openai`` SDK -> sidecar with a policy -> llama-server, budgets in Redis.

A real model server reports the usage that budgets are settled to; what is asserted
exactly is that Redis ends holding the sum of the ``usage`` llama-server reported to the
client (streamed and not), that max_tokens is clamped where the client sees it, that the
budget refuses once it is spent, and that no reservation is left open.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import openai
import pytest
import redis

from sidecar.server import Sidecar
from tests.e2e.conftest import LlamaServer, guarded_sidecar

pytestmark = pytest.mark.e2e

MESSAGES: list[Any] = [{"role": "user", "content": "Name three colours of the rainbow."}]
BUDGET = 400  # tokens a day: a handful of requests of ~30 prompt + 12 generated tokens
CEILING = 12


@pytest.fixture
async def guarded(
    llama_server: LlamaServer, redis_url: str, workload: str, tmp_path: Path
) -> AsyncIterator[tuple[Sidecar, str]]:
    rules = {
        "modelLimits": {llama_server.model: {"tokensPerMinute": 10**7}},
        "defaults": {
            "maxTokens": {"default": 8, "ceiling": CEILING, "overCeiling": "clamp"},
            "budget": {"daily": BUDGET},
            "rateLimit": {"tokensPerMinute": 10**7},
        },
    }
    async with guarded_sidecar(llama_server, redis_url, workload, tmp_path / "policy.yaml", rules) as guarded:
        yield guarded


async def test_budgets_settle_to_the_usage_llama_server_reports(
    guarded: tuple[Sidecar, str], llama_server: LlamaServer, redis_url: str
) -> None:
    sidecar, scope = guarded
    client = openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{sidecar.port}/v1",
        api_key="unused",
        max_retries=0,
        default_headers={"X-Tenant-ID": "acme"},
    )
    reported = 0
    served = 0
    try:
        with pytest.raises(openai.RateLimitError) as refused:
            for i in range(50):
                if i % 2:
                    raw = await client.chat.completions.with_raw_response.create(
                        model=llama_server.model, messages=MESSAGES, max_tokens=40, temperature=0
                    )
                    assert (
                        raw.headers["x-tokenscaler-max-tokens"] == f"{CEILING}; action=clamped; requested=40"
                    )
                    chat = raw.parse()
                    assert chat.usage is not None and chat.usage.completion_tokens <= CEILING
                    reported += chat.usage.total_tokens
                else:
                    stream = await client.chat.completions.create(
                        model=llama_server.model,
                        messages=MESSAGES,
                        max_tokens=40,
                        temperature=0,
                        stream=True,
                        stream_options={"include_usage": True},
                    )
                    async for chunk in stream:
                        if chunk.usage is not None:
                            assert chunk.usage.completion_tokens <= CEILING
                            reported += chunk.usage.total_tokens
                served += 1
        assert refused.value.code == "budget_exceeded"
    finally:
        await client.close()
    assert sidecar.policy is not None
    await sidecar.policy.close(10)
    r = redis.Redis.from_url(redis_url)
    try:
        base = f"tokenscaler:v1:{{policy:{scope}:acme}}"
        days = r.keys(f"{base}:budget:d:*")  # two if the run crossed midnight (UTC)
        # Exactly what llama-server reported, though each was reserved at its estimate.
        assert sum(int(r.get(day) or 0) for day in days) == reported
        assert r.hlen(f"{base}:res") == 0 and r.zcard(f"{base}:lease") == 0
        assert served >= 3 and BUDGET - 60 < reported <= BUDGET + 60
        print(
            f"\npolicies e2e: {served} requests, {reported} tokens reported = held in Redis, budget {BUDGET}"
        )
    finally:
        r.close()
