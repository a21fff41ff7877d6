"""From zero against the real llama-server: gateway -> sidecar -> llama-server, as processes.

The scaler, a gateway and the replica's sidecar run as processes; the model server is the
session's llama-server (``llama_server``), which a replica's sidecar fronts when the
stand-in for KEDA + HPA (``tests/gateway/processes.py``) starts it. Held requests wake the
workload, every one is answered (the official ``openai`` SDK, greedy decoding: the same
answer as straight from llama-server), the first answer begins at most 1.5 s after the
replica announced itself (``first_answer_bound``: its response starts to go out, which
llama-server may begin before its first token), the stream counts each once, and the
workload returns to zero after the cooldown.
Timings go to stdout as ``E2E from zero`` lines.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import openai
import pytest

from bench._common import Scaler
from tests.e2e.conftest import LlamaServer
from tests.e2e.test_e2e_scaling import report
from tests.gateway.processes import Autoscaler, GatewayProcess
from tests.gateway.test_gateway_from_zero import METADATA, first_answer_bound, stream_sums, until

pytestmark = pytest.mark.e2e

PROMPTS = [f"Name {n} colours of the rainbow." for n in ("two", "three", "four")]


async def test_from_zero_to_llama_server_and_back(
    llama_server: LlamaServer, redis_url: str, workload: str, tmp_path: Path
) -> None:
    log = tmp_path / "processes.log"
    model = llama_server.model
    direct = openai.AsyncOpenAI(
        base_url=llama_server.openai_base_url,
        api_key="unused",
        max_retries=0,
        timeout=60,
        default_headers={"Connection": "close"},
    )
    expected = []
    for prompt in PROMPTS:
        answer = await direct.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=8, temperature=0
        )
        expected.append(answer.choices[0].message.content)
    await direct.close()

    scaler = await asyncio.to_thread(Scaler, redis_url)
    gateway = GatewayProcess(redis_url, workload, log)
    await gateway.start()
    client = openai.AsyncOpenAI(base_url=gateway.base_url, api_key="unused", max_retries=0, timeout=60)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{scaler.grpc_port}") as channel:
            autoscaler = Autoscaler(
                channel,
                "scaler:9090",
                workload,
                METADATA,
                redis_url,
                log,
                upstream=llama_server.base_url,
                models=model,
            )
            await autoscaler.start()
            try:
                await asyncio.sleep(1.0)
                assert autoscaler.replicas == []

                async def ask(prompt: str) -> tuple[float, str, int]:
                    stream = await client.chat.completions.create(
                        model=model,
                        messages=[{"role": "user", "content": prompt}],
                        max_tokens=8,
                        temperature=0,
                        stream=True,
                        stream_options={"include_usage": True},
                    )
                    text, tokens = "", 0
                    async for chunk in stream:
                        if chunk.choices:
                            text += chunk.choices[0].delta.content or ""
                        if chunk.usage is not None:
                            tokens = chunk.usage.completion_tokens
                    return time.monotonic(), text, tokens

                sent = time.monotonic()
                results = await asyncio.gather(*(ask(p) for p in PROMPTS))
                assert [text for _, text, _ in results] == expected
                replica = autoscaler.started_replicas[0]
                bound = first_answer_bound(gateway, replica.name)
                report(
                    "from zero",
                    activated_after_first_request_s=round(autoscaler.activations[0] - sent, 3),
                    sidecar_start_to_ready_s=round(replica.ready - replica.started, 3),
                    first_answer_after_replica_ready_s=round(
                        min(t for t, _, _ in results) - replica.ready, 3
                    ),
                    gateway_discovery=bound,
                )
                await until(lambda: not autoscaler.replicas, 90, "the scale-down to zero")
            finally:
                await autoscaler.close()
    finally:
        await client.close()
        code = gateway.stop()
        await asyncio.to_thread(scaler.stop)
    assert code == 0
    held, served = stream_sums(redis_url, workload)
    assert held == {"sp": 0, "sg": 0, "ap": 0, "ag": 0, "rq": 0, "ar": 0}
    assert served["rq"] == served["ar"] == len(PROMPTS)
    assert served["sg"] == served["ag"] == sum(tokens for _, _, tokens in results)
