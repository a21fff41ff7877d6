"""End to end: hostile request shapes through the sidecar to the real llama-server.

For every shape, either the sidecar refused it (400 with its own error code, nothing reached
llama-server), or llama-server answered within what the sidecar admitted (the ceiling), and over
the corpus the budget in Redis holds exactly the usage llama-server reported. llama.cpp's server
reads ``n_predict`` as well as ``max_tokens``: a limit the sidecar must meter and rewrite too.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis

from sidecar.server import Sidecar
from tests.e2e.conftest import LlamaServer, guarded_sidecar
from tests.sidecar.policy.test_policy_proxy import settled
from tests.sidecar.test_differential import raw_post

pytestmark = pytest.mark.e2e

CEILING = 12
OURS = {"invalid_json", "invalid_value", "invalid_path"}


def corpus(model: str) -> list[tuple[str, str, bytes, bool]]:
    msgs = [{"role": "user", "content": "Name a colour."}]

    def chat(**fields: Any) -> bytes:
        return json.dumps({"model": model, "messages": msgs, "temperature": 0, **fields}).encode()

    def completion(**fields: Any) -> bytes:
        return json.dumps({"model": model, "prompt": "Colours:", "temperature": 0, **fields}).encode()

    chat_path = "/v1/chat/completions"
    return [
        ("plain", chat_path, chat(max_tokens=5), False),
        ("n as a string", chat_path, chat(n="500"), True),
        ("n as a float", chat_path, chat(n=500.0), True),
        (
            "a limit as a string beside another",
            chat_path,
            chat(max_tokens=5, max_completion_tokens="2000"),
            True,
        ),
        ("conflicting limits", chat_path, chat(max_tokens=5, max_completion_tokens=2000), True),
        ("over the ceiling", chat_path, chat(max_completion_tokens=2000), False),
        ("n_predict alone over the ceiling", "/v1/completions", completion(n_predict=2000), False),
        ("n_predict beside max_tokens", "/v1/completions", completion(max_tokens=5, n_predict=2000), True),
        ("stream as a string", chat_path, chat(stream="true", max_tokens=5), True),
        (
            "a stream over the ceiling",
            chat_path,
            chat(stream=True, stream_options={"include_usage": True}, max_tokens=2000),
            False,
        ),
        (
            "duplicate limit keys",
            chat_path,
            chat(max_tokens=5)[:-1] + b',"max_tokens":2000}',
            True,
        ),
        ("a dot segment", "/v1/./chat/completions", chat(max_tokens=2000), False),
        ("a dot-dot segment", "/v1/x/../chat/completions", chat(max_tokens=2000), False),
        ("no /v1 (llama.cpp serves it)", "/chat/completions", chat(max_tokens=2000), False),
        ("encoded slashes", "/v1%2Fchat%2Fcompletions", chat(max_tokens=2000), True),
        ("llama.cpp's native completion", "/completion", completion(n_predict=2000), True),
        ("deep JSON", chat_path, chat()[:-1] + b',"x":' + b"[" * 5000 + b"]" * 5000 + b"}", True),
    ]


@pytest.fixture
async def guarded(
    llama_server: LlamaServer, redis_url: str, workload: str, tmp_path: Path
) -> AsyncIterator[tuple[Sidecar, str]]:
    rules = {
        "reservationChunks": {"seconds": 0},
        "defaults": {"maxTokens": {"default": 8, "ceiling": CEILING}, "budget": {"daily": 10**6}},
    }
    async with guarded_sidecar(llama_server, redis_url, workload, tmp_path / "policy.yaml", rules) as guarded:
        yield guarded


def dechunked(answer: bytes) -> bytes:
    """A chunked transfer-encoded body, joined (raw_post reads the bytes as they came)."""
    out: list[bytes] = []
    at = 0
    while True:
        line_end = answer.index(b"\r\n", at)
        size = int(answer[at:line_end].split(b";")[0], 16)
        if size == 0:
            return b"".join(out)
        out.append(answer[line_end + 2 : line_end + 2 + size])
        at = line_end + 2 + size + 2


def usage_of(answer: bytes, streamed: bool) -> dict[str, int]:
    if not streamed:
        usage: dict[str, int] = json.loads(answer)["usage"]
        return usage
    found: dict[str, int] = {}
    for line in dechunked(answer).decode().splitlines():
        if line.startswith("data: {"):
            doc = json.loads(line[6:])
            if doc.get("usage"):
                found = doc["usage"]
    return found


def charged(redis_url: str, scope: str, tenant: str) -> int:
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"tokenscaler:v1:{{policy:{scope}:{tenant}}}:budget:d:*"))
        return sum(int(client.get(k) or 0) for k in keys)
    finally:
        client.close()


async def test_hostile_shapes_against_llama_server(
    guarded: tuple[Sidecar, str], llama_server: LlamaServer, redis_url: str
) -> None:
    sidecar, scope = guarded
    reported = 0
    outcomes = {}
    for name, path, body, _refused in corpus(llama_server.model):
        status, answer = await raw_post(sidecar.port, path, body)
        if status == 400 and json.loads(answer)["error"]["code"] in OURS:
            outcomes[name] = "refused"
            continue
        assert status == 200, (name, status, answer[:300])
        outcomes[name] = "served"
        usage = usage_of(answer, b'"stream": true' in body)
        assert 0 < usage["completion_tokens"] <= CEILING, (name, usage)
        reported += usage["prompt_tokens"] + usage["completion_tokens"]
    assert outcomes == {name: "refused" if refused else "served" for name, _p, _b, refused in corpus("m")}
    await settled(sidecar)
    assert charged(redis_url, scope, "mallory") == reported
