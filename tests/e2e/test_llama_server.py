"""Smoke tests of the real model server itself, through the official ``openai`` SDK.

They pin down what the later end-to-end tests rely on: llama-server reports ``usage``
(streaming too, with ``stream_options={"include_usage": True}``) and ``timings``, and
the two agree. Greedy decoding (temperature 0) and a few tokens keep them fast on a CPU.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.e2e.conftest import LlamaServer, Timings

pytestmark = pytest.mark.e2e

MAX_TOKENS = 16
MESSAGES: list[Any] = [{"role": "user", "content": "Name three colours of the rainbow."}]
PROMPT = "The three primary colours are"


@pytest.fixture
def client(llama_server: LlamaServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=llama_server.openai_base_url, api_key="unused", max_retries=0) as c:
        yield c


def _check_usage(usage: Any, max_tokens: int = MAX_TOKENS) -> None:
    assert usage is not None, "no usage in the response"
    assert usage.prompt_tokens > 0
    assert 0 < usage.completion_tokens <= max_tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def _check_timings(t: Timings, usage: Any) -> None:
    # Every generated token is one llama-server decoded; the prompt is split between
    # the tokens it evaluated and those its prompt cache already held.
    assert t.predicted_n == usage.completion_tokens
    assert t.prompt_n + t.cache_n == usage.prompt_tokens
    assert t.prompt_n >= 1  # at least the last prompt token is always evaluated
    assert t.predicted_per_second > 0
    assert t.prompt_per_second > 0
    assert t.predicted_ms > 0


def test_health_and_models(llama_server: LlamaServer, client: openai.OpenAI) -> None:
    with urllib.request.urlopen(f"{llama_server.base_url}/health", timeout=5) as response:
        assert json.load(response)["status"] == "ok"
    assert llama_server.model in [m.id for m in client.models.list()]


API = pytest.mark.parametrize("api", ["chat", "completion"])


def _create(client: openai.OpenAI, server: LlamaServer, api: str, **kwargs: Any) -> Any:
    """POST /v1/chat/completions (``api="chat"``) or /v1/completions, greedy and short."""
    request: dict[str, Any] = {"model": server.model, "temperature": 0, "max_tokens": MAX_TOKENS, **kwargs}
    if api == "chat":
        return client.chat.completions.create(messages=MESSAGES, **request)
    return client.completions.create(prompt=PROMPT, **request)


def _text(response: Any, api: str) -> str:
    """The text of a response, or of one stream chunk."""
    if not response.choices:
        return ""
    choice = response.choices[0]
    if api == "completion":
        return str(choice.text)
    message = getattr(choice, "message", None) or choice.delta
    return str(message.content or "")


@API
def test_reports_usage_and_timings(llama_server: LlamaServer, client: openai.OpenAI, api: str) -> None:
    response = _create(client, llama_server, api)
    assert response.model
    assert _text(response, api)
    assert response.choices[0].finish_reason in {"stop", "length"}
    _check_usage(response.usage)
    _check_timings(llama_server.record(response, api), response.usage)


@API
def test_stream_usage_matches_non_stream(llama_server: LlamaServer, client: openai.OpenAI, api: str) -> None:
    # No prompt cache: both calls evaluate their whole prompt.
    no_cache = {"extra_body": {"cache_prompt": False}}
    plain = _create(client, llama_server, api, **no_cache)
    chunks = list(
        _create(client, llama_server, api, **no_cache, stream=True, stream_options={"include_usage": True})
    )

    assert "".join(_text(c, api) for c in chunks) == _text(plain, api)  # greedy: the same answer
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1 and usage_chunks[0] is chunks[-1], "usage must come once, in the last chunk"
    last = chunks[-1]
    _check_usage(last.usage)
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (
        plain.usage.prompt_tokens,
        plain.usage.completion_tokens,
    )
    # One text delta per generated token at most (a partial UTF-8 character waits).
    assert sum(1 for c in chunks if _text(c, api)) <= last.usage.completion_tokens

    t_plain = llama_server.record(plain, f"{api} no-cache")
    t_stream = llama_server.record(last, f"{api} stream no-cache")
    _check_timings(t_plain, plain.usage)
    _check_timings(t_stream, last.usage)
    assert t_plain.cache_n == t_stream.cache_n == 0
    assert t_stream.prompt_n == plain.usage.prompt_tokens


def test_chat_usage_chunk_has_openai_shape(llama_server: LlamaServer, client: openai.OpenAI) -> None:
    chunks = list(_create(client, llama_server, "chat", stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None
    assert chunks[-1].choices == []  # OpenAI's shape for the usage chunk
    assert chunks[-2].choices[0].finish_reason in {"stop", "length"}


def test_chat_stream_without_include_usage_has_no_usage(
    llama_server: LlamaServer, client: openai.OpenAI
) -> None:
    chunks = list(_create(client, llama_server, "chat", max_tokens=4, stream=True))
    assert chunks and all(c.usage is None for c in chunks)


def test_prompt_cache_is_reported_in_timings(llama_server: LlamaServer, client: openai.OpenAI) -> None:
    # The same request twice: the second finds its prompt in the slot's cache. usage
    # still counts the whole prompt; timings say how much was really evaluated.
    first, second = (_create(client, llama_server, "chat", max_tokens=8) for _ in range(2))
    assert first.usage is not None and second.usage is not None
    assert first.usage.prompt_tokens == second.usage.prompt_tokens
    t_second = llama_server.record(second, "chat cached prompt")
    _check_timings(t_second, second.usage)
    details = second.usage.prompt_tokens_details
    assert t_second.cache_n > 0
    assert details is not None and details.cached_tokens == t_second.cache_n


def test_generation_speed_over_a_longer_answer(llama_server: LlamaServer, client: openai.OpenAI) -> None:
    # The figure later tests compare the scaler's tokens/s with: a 64-token generation.
    response = _create(
        client,
        llama_server,
        "completion",
        max_tokens=64,
        extra_body={"ignore_eos": True, "cache_prompt": False},
    )
    assert response.usage is not None and response.usage.completion_tokens == 64
    t = llama_server.record(response, "completion 64 tokens")
    _check_timings(t, response.usage)
    # llama-server's rate leaves out the first token, which comes with the prompt's
    # evaluation: predicted_per_second = (predicted_n - 1) / predicted_ms.
    assert t.predicted_per_second == pytest.approx((t.predicted_n - 1) / (t.predicted_ms / 1000), rel=1e-6)
    assert t.predicted_per_second < 10_000  # a 270M model on a CPU


def test_metrics_endpoint_counts_tokens(llama_server: LlamaServer, client: openai.OpenAI) -> None:
    def counters() -> dict[str, float]:
        with urllib.request.urlopen(f"{llama_server.base_url}/metrics", timeout=5) as response:
            text = response.read().decode()
        return {
            line.split()[0]: float(line.split()[1])
            for line in text.splitlines()
            if line and not line.startswith("#")
        }

    before = counters()
    response = _create(client, llama_server, "completion", max_tokens=8, extra_body={"cache_prompt": False})
    after = counters()
    assert response.usage is not None
    generated = after["llamacpp:tokens_predicted_total"] - before["llamacpp:tokens_predicted_total"]
    prompt = after["llamacpp:prompt_tokens_total"] - before["llamacpp:prompt_tokens_total"]
    assert generated == response.usage.completion_tokens
    assert prompt == response.usage.prompt_tokens


async def test_the_sidecar_reads_llama_servers_own_gauges(llama_server: LlamaServer) -> None:
    """llama-server's real /metrics (--metrics): requests processing and deferred, as the
    sidecar's poller reads them into its records. While a stream is under way one request is
    processing; this build exports no KV-cache gauge, and the parse says so (None)."""
    import asyncio

    import aiohttp

    from sidecar.server_gauges import ServerGaugePoller
    from token_scaler.record import ServerGauges

    poller = ServerGaugePoller(f"{llama_server.base_url}/metrics")
    async with (
        openai.AsyncOpenAI(base_url=llama_server.openai_base_url, api_key="unused", max_retries=0) as aclient,
        aiohttp.ClientSession() as session,
    ):
        assert await poller.poll_once(session)
        idle = poller.latest()
        assert idle is not None and idle.running == 0 and idle.waiting == 0
        stream = await aclient.chat.completions.create(
            model=llama_server.model, messages=MESSAGES, max_tokens=64, temperature=0, stream=True
        )
        seen: list[ServerGauges | None] = []
        async for _chunk in stream:
            if not seen:
                assert await poller.poll_once(session)
                seen.append(poller.latest())
            await asyncio.sleep(0)
        busy = seen[0]
        assert busy is not None and busy.running == 1 and busy.waiting == 0
        assert busy.kv_usage is None or 0 <= busy.kv_usage <= 1
