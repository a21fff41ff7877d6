"""The 1e15 case end to end: a model server that reports ``completion_tokens: 1e15`` ->
sidecar (with a budget) -> Redis -> scaler -> the value KEDA gets over gRPC.

Before the bounds, that one response sent ``tokenscaler_tokens_total`` to 1e15, charged the
tenant's budget 1e15 and made the scaler answer 2e14 (the HPA's maxReplicaCount). Now
every number downstream is the sidecar's own count of what passed.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from tests.scaler.test_scaler_service import start as start_scaler
from tests.sidecar.conftest import StartSidecar, read_records, scope, totals
from tests.sidecar.policy.test_policy_proxy import settled, used, write_policy
from tests.sidecar.scripted_upstream import Choice, Generation, ScriptedUpstream, render_chat

HUGE = 10**15
WORDS = [f"w{i} " for i in range(40)]  # 40 tokens, one a chunk


LIES: dict[str, dict[str, Any]] = {
    "completion_tokens": {"completion_tokens": HUGE},
    # hidden reasoning, with no maximum set: bounded by the time the request took
    "reasoning_tokens": {"completion_tokens": HUGE, "completion_tokens_details": {"reasoning_tokens": HUGE}},
}


@pytest.mark.parametrize("lie_in", list(LIES))
async def test_a_usage_of_1e15_does_not_reach_keda_metrics_or_budgets(
    start_sidecar: StartSidecar, policy_file: Path, workload: str, redis_url: str, lie_in: str
) -> None:
    upstream = ScriptedUpstream()
    url = await upstream.start()
    write_policy(
        policy_file, {"scope": scope(workload), "defaults": {"budget": {"daily": 10**9, "monthly": 10**10}}}
    )
    sidecar = await start_sidecar(policy=policy_file, upstream=url, flush_interval_s=0.2)
    scaler = await start_scaler(redis_url, debug_open=True)  # the debug page is read without a token
    ns, name = workload.split("/")
    metadata = {"tokensPerSecondPerReplica": "100", "headroom": "1", "windowSeconds": "10"}
    generation = Generation([Choice(content=WORDS, silent=1)], 0, [], 9)
    honest = render_chat(generation, "m", stream=True, per_chunk=1)
    lie = render_chat(generation, "m", stream=True, per_chunk=1)
    assert lie.usage_event is not None
    lie.usage_event["usage"] = {"prompt_tokens": 9, "total_tokens": HUGE + 9, **LIES[lie_in]}
    upstream.scripts.update({"honest": honest, "lie": lie})
    try:
        async with openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{sidecar.port}/v1", api_key="k", max_retries=0
        ) as client:
            for key in ("honest", "lie"):
                stream = await client.chat.completions.create(
                    model="m",
                    messages=[{"role": "user", "content": "hi"}],
                    stream=True,
                    extra_headers={"X-Script": key, "X-Tenant-ID": "acme"},
                )
                chunks: list[Any] = [chunk async for chunk in stream]
                assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "".join(
                    WORDS
                )
        await settled(sidecar)

        # the sidecar: its metrics and the tenant's budget take its own count of the lie (40 pieces)
        def sample(metric: str, **labels: str) -> float:
            return sidecar.registry.get_sample_value(metric, labels) or 0.0

        assert sample("tokenscaler_tokens_total", type="generation", model="m", tenant="acme") == 41 + 40
        assert sample("tokenscaler_usage_implausible_total", field="generation") == 1
        assert used(redis_url, workload, "acme") == 9 + 41 + 9 + 40

        # the stream: what was flushed adds up to the same
        records = []
        for _ in range(50):
            records = read_records(redis_url, workload)
            if totals(records)["rq"] == 2:
                break
            await asyncio.sleep(0.1)
        assert totals(records) == {"sp": 18, "sg": 81, "ap": 18, "ag": 81, "rq": 2}

        # the scaler: KEDA's value is the real rate, and no entry needed clamping
        value = 0.0
        for _ in range(40):
            answer = await scaler.keda.poll(ns, name, metadata)
            value = answer.value
            if value > 0:
                break
            await asyncio.sleep(0.1)
        counted = sample("tokenscaler_tokens_total", type="generation", model="m", tenant="acme")
        print(f"1E15 lie in {lie_in}: KEDA value {value:.1f}, sidecar generation {counted:.0f}")
        assert 0 < value <= 18 + 81
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{scaler.http}/debug/scalers/{workload}") as resp,
        ):
            body = await resp.json()
        assert body["stream"]["implausibleEntries"] == 0
        assert body["tenantsLast60s"]["acme"]["generationTokensPerSecond"] <= 81
    finally:
        await scaler.channel.close()
        await scaler.server.stop()
        await upstream.stop()
