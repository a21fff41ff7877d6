"""llama-server's honest usage passes the sidecar's plausibility bounds unchanged.

The ``openai`` SDK -> sidecar -> llama-server (Gemma 3 270M): across chat, completions and
the Responses API, streamed or not, n = 2, a tool call, JSON output, multi-byte text, a stop
string and no max_tokens, the tokens the sidecar
counts are exactly the usage llama-server reported to the client, and nothing is counted
in ``tokenscaler_usage_implausible_total``.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from prometheus_client import CollectorRegistry

from sidecar.server import Sidecar
from tests.e2e.conftest import LlamaServer, sidecar_config

pytestmark = pytest.mark.e2e

MULTI_BYTE = "用中文写一句关于猫的诗 加上表情符号 🐱✨。Écris aussi une phrase en français."
CASES: dict[str, dict[str, Any]] = {
    "chat": {"messages": [{"role": "user", "content": "Name three colours."}], "max_tokens": 12},
    # llama-server's own n_predict ends it; the sidecar sees a request with no maximum
    "chat, no max_tokens": {
        "messages": [{"role": "user", "content": "Say hello."}],
        "extra_body": {"n_predict": 24},
    },
    "chat, multi-byte": {"messages": [{"role": "user", "content": MULTI_BYTE}], "max_tokens": 40},
    "chat, JSON output": {
        "messages": [{"role": "user", "content": "Give a JSON object with a name and an age."}],
        "response_format": {"type": "json_object"},
        "max_completion_tokens": 40,
    },
    "chat, n=2": {"messages": [{"role": "user", "content": "Name a fruit."}], "n": 2, "max_tokens": 8},
    "chat, tools": {
        "messages": [{"role": "user", "content": "What is the weather in Paris? Use the tool."}],
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "The weather in a city",
                    "parameters": {
                        "type": "object",
                        "properties": {"city": {"type": "string"}},
                        "required": ["city"],
                    },
                },
            }
        ],
        "tool_choice": "required",
        "max_tokens": 30,
    },
    "responses": {"input": "Name three colours.", "max_output_tokens": 16},
    "responses, multi-byte": {"input": MULTI_BYTE, "max_output_tokens": 30},
    "completion": {"prompt": "The three primary colours are", "max_tokens": 12},
    "completion, multi-byte": {"prompt": MULTI_BYTE, "max_tokens": 30},
    "completion, stop": {"prompt": "1, 2, 3, 4,", "max_tokens": 30, "stop": [" 9"]},
}


@pytest.fixture
async def sidecar(llama_server: LlamaServer, redis_url: str, workload: str) -> AsyncIterator[Sidecar]:
    running = Sidecar(
        sidecar_config(llama_server, redis_url, workload, sidecar_id=f"e2e-{uuid.uuid4().hex[:8]}"),
        CollectorRegistry(),
    )
    await running.start()
    try:
        yield running
    finally:
        await running.stop()


def sample(sidecar: Sidecar, name: str, **labels: str) -> float:
    return sidecar.registry.get_sample_value(name, labels) or 0.0


async def send(
    client: openai.AsyncOpenAI, model: str, request: dict[str, Any], stream: bool
) -> tuple[int, int]:
    """The prompt and generated tokens llama-server reported to the client."""
    extra: dict[str, Any] = {"model": model, "temperature": 0, **request}
    if "input" in request:
        response: Any = await client.responses.create(**extra, stream=stream)
        if not stream:
            usage = response.usage
        else:
            done = [event async for event in response if event.type == "response.completed"]
            assert len(done) == 1
            usage = done[0].response.usage
        return usage.input_tokens, usage.output_tokens
    if stream:
        extra.update(stream=True, stream_options={"include_usage": True})
    if "messages" in request:
        response = await client.chat.completions.create(**extra)
    else:
        response = await client.completions.create(**extra)
    if not stream:
        return response.usage.prompt_tokens, response.usage.completion_tokens
    usages = [chunk.usage async for chunk in response if chunk.usage is not None]
    # with n > 1 llama-server sends one usage chunk per choice, each saying the same as the
    # whole answer's usage; the sidecar counts the last, as a client reading usage would
    assert len(usages) == request.get("n", 1)
    return usages[-1].prompt_tokens, usages[-1].completion_tokens


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_honest_usage_passes_unchanged(
    llama_server: LlamaServer, sidecar: Sidecar, stream: bool
) -> None:
    model = llama_server.model
    async with openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{sidecar.port}/v1", api_key="unused", max_retries=0, timeout=120
    ) as client:
        for label, request in CASES.items():
            before = {
                t: sample(sidecar, "tokenscaler_tokens_total", type=t, model=model, tenant="none")
                for t in ("prompt", "generation")
            }
            usage = await send(client, model, request, stream)
            assert usage[1] > 0, label
            # the sidecar settles right after the last byte
            for _ in range(200):
                generation = sample(
                    sidecar, "tokenscaler_tokens_total", type="generation", model=model, tenant="none"
                )
                if generation != before["generation"]:
                    break
                await asyncio.sleep(0.01)
            prompt = sample(sidecar, "tokenscaler_tokens_total", type="prompt", model=model, tenant="none")
            assert (prompt - before["prompt"], generation - before["generation"]) == usage, label
    for field in ("prompt", "generation"):
        assert sample(sidecar, "tokenscaler_usage_implausible_total", field=field) == 0
