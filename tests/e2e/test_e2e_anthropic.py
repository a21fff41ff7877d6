"""End to end: the ``anthropic`` and ``openai`` SDKs -> sidecar with a policy -> llama-server.

llama-server serves Anthropic's Messages API beside OpenAI's chat. One tenant spends one token
budget through both; what is asserted exactly is that Redis ends holding the sum of the usage
llama-server reported to the clients (Messages usage: input + cache creation + cache read +
output), that the stream records hold the same prompt and generated tokens, that max_tokens is
clamped on both, and that the budget's refusal reaches each SDK in its own shape.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
import redis

from sidecar.server import Sidecar
from tests.e2e.conftest import LlamaServer, guarded_sidecar
from tests.sidecar.conftest import read_records, totals

pytestmark = pytest.mark.e2e

MESSAGES: list[Any] = [{"role": "user", "content": "Name three colours of the rainbow."}]
BUDGET = 400
CEILING = 12


@pytest.fixture
async def guarded(
    llama_server: LlamaServer, redis_url: str, workload: str, tmp_path: Path
) -> AsyncIterator[tuple[Sidecar, str]]:
    rules = {
        "reservationChunks": {"seconds": 0},
        "defaults": {
            "maxTokens": {"default": 8, "ceiling": CEILING, "overCeiling": "clamp"},
            "budget": {"daily": BUDGET},
        },
    }
    async with guarded_sidecar(
        llama_server, redis_url, workload, tmp_path / "policy.yaml", rules, flush_interval_s=3600.0
    ) as guarded:
        yield guarded


def _input(usage: Any) -> int:
    return int(
        usage.input_tokens + (usage.cache_creation_input_tokens or 0) + (usage.cache_read_input_tokens or 0)
    )


async def test_one_budget_through_both_sdks_settles_to_what_llama_server_reported(
    guarded: tuple[Sidecar, str], llama_server: LlamaServer, redis_url: str, workload: str
) -> None:
    sidecar, scope = guarded
    headers = {"X-Tenant-ID": "acme"}
    url = f"http://127.0.0.1:{sidecar.port}"
    claude = anthropic.AsyncAnthropic(base_url=url, api_key="unused", max_retries=0, default_headers=headers)
    gpt = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, default_headers=headers)
    prompt = generated = served = 0
    try:
        with pytest.raises((anthropic.RateLimitError, openai.RateLimitError)) as refused:
            for i in range(60):
                if i % 3 == 0:
                    raw = await claude.messages.with_raw_response.create(
                        model=llama_server.model,
                        max_tokens=40,
                        messages=MESSAGES,
                        extra_body={"temperature": 0},
                    )
                    assert (
                        raw.headers["x-tokenscaler-max-tokens"] == f"{CEILING}; action=clamped; requested=40"
                    )
                    usage = (await raw.parse()).usage
                elif i % 3 == 1:
                    async with claude.messages.stream(
                        model=llama_server.model,
                        max_tokens=40,
                        messages=MESSAGES,
                        extra_body={"temperature": 0},
                    ) as stream:
                        usage = (await stream.get_final_message()).usage
                else:
                    chat = await gpt.chat.completions.create(
                        model=llama_server.model, messages=MESSAGES, max_tokens=40, temperature=0
                    )
                    assert chat.usage is not None and chat.usage.completion_tokens <= CEILING
                    prompt += chat.usage.prompt_tokens
                    generated += chat.usage.completion_tokens
                    served += 1
                    continue
                assert 0 < usage.output_tokens <= CEILING
                prompt += _input(usage)
                generated += usage.output_tokens
                served += 1
        error = refused.value
        if isinstance(error, anthropic.RateLimitError):
            assert isinstance(error.body, dict) and error.body["error"]["type"] == "rate_limit_error"
        else:
            assert isinstance(error, openai.RateLimitError) and error.code == "budget_exceeded"
    finally:
        await claude.close()
        await gpt.close()
    assert sidecar.policy is not None
    await sidecar.policy.close(10)
    sidecar.flusher.tick()
    assert await sidecar.flusher.deliver()
    got = totals(read_records(redis_url, workload))
    assert (got["sp"], got["sg"]) == (prompt, generated)
    r = redis.Redis.from_url(redis_url)
    try:
        base = f"tokenscaler:v1:{{policy:{scope}:acme}}"
        days = r.keys(f"{base}:budget:d:*")  # two if the run crossed midnight (UTC)
        assert sum(int(r.get(day) or 0) for day in days) == prompt + generated
        assert r.hlen(f"{base}:res") == 0 and r.zcard(f"{base}:lease") == 0
        assert served >= 3 and BUDGET - 60 < prompt + generated <= BUDGET + 60
        print(f"\nanthropic e2e: {served} requests, {prompt} + {generated} tokens reported = held in Redis")
    finally:
        r.close()
