"""Closed-loop load against an OpenAI-compatible endpoint: ``concurrency`` workers each send
streaming requests back to back for a while; every request's timings and usage are kept.

A request's prompt is made of random words (so no prompt cache helps), about one token a
word; its real size is what the server reports in ``usage`` (``stream_options.include_usage``).
``ignore_eos`` (vLLM, llama.cpp, SGLang) makes the server generate ``max_tokens`` tokens.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from sidecar.sse import SSEParser
from tuning.errors import EndpointError

_WORDS = [
    "time",
    "year",
    "people",
    "way",
    "day",
    "man",
    "thing",
    "woman",
    "life",
    "child",
    "world",
    "school",
    "state",
    "family",
    "student",
    "group",
    "country",
    "problem",
    "hand",
    "part",
    "place",
    "case",
    "week",
    "company",
    "system",
    "program",
    "question",
    "work",
    "government",
    "number",
    "night",
    "point",
    "home",
    "water",
    "room",
    "mother",
    "area",
    "money",
    "story",
    "fact",
    "month",
    "lot",
    "right",
    "study",
    "book",
    "eye",
    "job",
    "word",
    "business",
    "issue",
    "side",
    "kind",
    "head",
    "house",
    "service",
    "friend",
    "father",
    "power",
    "hour",
    "game",
    "line",
    "end",
    "member",
    "law",
    "car",
    "city",
    "community",
    "name",
    "president",
    "team",
    "minute",
    "idea",
    "kid",
    "body",
    "information",
    "back",
    "parent",
    "face",
    "others",
    "level",
    "office",
    "door",
    "health",
    "person",
    "art",
    "war",
    "history",
    "party",
    "result",
    "change",
    "morning",
    "reason",
    "research",
    "girl",
    "guy",
]


@dataclass
class Shot:
    """One request: when it was sent, its first and later tokens arrived, and its usage."""

    sent: float
    prompt_target: int
    max_tokens: int
    first: float | None = None
    end: float | None = None
    chunks: list[float] = field(default_factory=list)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.end is not None and self.first is not None

    @property
    def ttft(self) -> float | None:
        return None if self.first is None else self.first - self.sent

    def gaps(self) -> list[float]:
        """Inter-token latency: time between content chunks, per token when a chunk held several."""
        if len(self.chunks) < 2 or not self.completion_tokens:
            return []
        per_chunk = max(1.0, (self.completion_tokens - 1) / (len(self.chunks) - 1))
        return [(b - a) / per_chunk for a, b in zip(self.chunks, self.chunks[1:], strict=False)]


def make_prompt(words: int, rng: random.Random) -> str:
    return f"{rng.randrange(10**9)} " + " ".join(rng.choice(_WORDS) for _ in range(max(1, words - 1)))


@dataclass(frozen=True)
class Target:
    base_url: str  # ends with /v1
    model: str
    api: str = "chat"  # or "completions"
    api_key: str | None = None
    ignore_eos: bool = True
    timeout_s: float = 120.0


def _headers(target: Target) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if target.api_key:
        headers["Authorization"] = f"Bearer {target.api_key}"
    return headers


async def discover_model(session: aiohttp.ClientSession, base_url: str, api_key: str | None) -> str:
    """The first model ``GET /v1/models`` lists."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with session.get(f"{base_url}/models", headers=headers) as response:
            if response.status != 200:
                raise EndpointError(f"GET {base_url}/models answered {response.status}; pass --model")
            body = await response.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise EndpointError(f"GET {base_url}/models failed ({exc!r}); pass --model") from exc
    data = body.get("data") if isinstance(body, dict) else None
    if not data or not isinstance(data[0], dict) or "id" not in data[0]:
        raise EndpointError(f"GET {base_url}/models listed no model; pass --model")
    return str(data[0]["id"])


async def send(session: aiohttp.ClientSession, target: Target, prompt: str, shot: Shot) -> None:
    body: dict[str, Any] = {
        "model": target.model,
        "max_tokens": shot.max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.7,
    }
    if target.ignore_eos:
        body["ignore_eos"] = True
    if target.api == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
        path = "/chat/completions"
    else:
        body["prompt"] = prompt
        path = "/completions"
    parser = SSEParser()
    timeout = aiohttp.ClientTimeout(total=target.timeout_s)
    try:
        async with session.post(
            target.base_url + path, json=body, headers=_headers(target), timeout=timeout
        ) as response:
            if response.status != 200:
                text = (await response.text())[:200]
                shot.error = f"HTTP {response.status}: {text}"
                return
            async for chunk in response.content.iter_any():
                now = time.perf_counter()
                for event in parser.feed(chunk):
                    _on_event(event.data, now, shot)
        shot.end = time.perf_counter()
    except (aiohttp.ClientError, TimeoutError) as exc:
        shot.error = f"{type(exc).__name__}: {exc}"
        return
    if shot.first is None:
        shot.error = "no token arrived"


def _on_event(data: str | None, now: float, shot: Shot) -> None:
    if not data or data.strip() == "[DONE]":
        return
    try:
        payload = json.loads(data)
    except ValueError:
        return
    if not isinstance(payload, dict):
        return
    usage = payload.get("usage")
    if isinstance(usage, dict):
        shot.prompt_tokens = _int(usage.get("prompt_tokens"))
        shot.completion_tokens = _int(usage.get("completion_tokens"))
    for choice in payload.get("choices") or []:
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            delta = {}
        text = delta.get("content") or delta.get("reasoning_content") or choice.get("text")
        if text:
            if shot.first is None:
                shot.first = now
            shot.chunks.append(now)


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclass(frozen=True)
class Shape:
    """Where request sizes come from: (prompt words, max tokens) pairs, drawn at random."""

    pairs: Sequence[tuple[int, int]]

    def draw(self, rng: random.Random) -> tuple[int, int]:
        return self.pairs[rng.randrange(len(self.pairs))]


async def run_step(
    session: aiohttp.ClientSession,
    target: Target,
    concurrency: int,
    seconds: float,
    shape: Shape,
    rng: random.Random,
    progress: Callable[[float, int], None] | None = None,
) -> tuple[list[Shot], float]:
    """``concurrency`` workers send back to back for ``seconds``; requests under way then finish.
    Returns every request and the step's wall time."""
    shots: list[Shot] = []
    start = time.perf_counter()
    deadline = start + seconds

    async def worker() -> None:
        while time.perf_counter() < deadline:
            words, max_tokens = shape.draw(rng)
            shot = Shot(time.perf_counter(), words, max_tokens)
            shots.append(shot)
            await send(session, target, make_prompt(words, rng), shot)
            if shot.error is not None:
                await asyncio.sleep(0.2)  # a failing server must not be hammered in a loop

    tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
    try:
        while not all(t.done() for t in tasks):
            await asyncio.wait(tasks, timeout=0.25)
            if progress is not None:
                progress(time.perf_counter() - start, sum(1 for s in shots if s.ok))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return shots, time.perf_counter() - start


async def run_open_step(
    session: aiohttp.ClientSession,
    target: Target,
    rate: float,
    seconds: float,
    shape: Shape,
    rng: random.Random,
    progress: Callable[[float, int], None] | None = None,
) -> tuple[list[Shot], float]:
    """Open loop: requests sent at Poisson arrivals of ``rate`` per second for ``seconds``,
    whatever the server's answers (as users arrive), then those under way finish. Unlike the
    closed loop, a server that slows down faces the same offered load and its queue grows.
    Returns every request and the step's wall time."""
    shots: list[Shot] = []
    tasks: set[asyncio.Task[None]] = set()
    start = time.perf_counter()
    deadline = start + seconds
    next_at = start + rng.expovariate(rate)
    try:
        while next_at < deadline:
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            words, max_tokens = shape.draw(rng)
            shot = Shot(time.perf_counter(), words, max_tokens)
            shots.append(shot)
            task = asyncio.create_task(send(session, target, make_prompt(words, rng), shot))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            next_at += rng.expovariate(rate)
            if progress is not None:
                progress(time.perf_counter() - start, sum(1 for s in shots if s.ok))
        while tasks:
            await asyncio.wait(set(tasks), timeout=0.25)
            if progress is not None:
                progress(time.perf_counter() - start, sum(1 for s in shots if s.ok))
    finally:
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return shots, time.perf_counter() - start


def mean_in_flight(shots: Sequence[Shot], seconds: float) -> float:
    """Requests in flight on average over the step (Little's law on what was measured)."""
    busy = sum((s.end if s.end is not None else s.sent) - s.sent for s in shots)
    return busy / seconds if seconds > 0 else 0.0


async def discover_kv_cache_tokens(session: aiohttp.ClientSession, root_url: str) -> tuple[int, str] | None:
    """The server's KV-cache capacity in tokens and where it was read, when it says:
    llama.cpp's ``/props`` (context per slot x slots) or vLLM's ``vllm:cache_config_info``
    metric (GPU blocks x block size). None when neither answers."""
    timeout = aiohttp.ClientTimeout(total=5)
    try:
        async with session.get(f"{root_url}/props", timeout=timeout) as response:
            if response.status == 200:
                props = await response.json(content_type=None)
                per_slot = _int(props.get("default_generation_settings", {}).get("n_ctx"))
                slots = _int(props.get("total_slots"))
                if per_slot and slots:
                    return per_slot * slots, f"/props: n_ctx {per_slot} x {slots} slots"
    except (aiohttp.ClientError, TimeoutError, ValueError, AttributeError):
        pass
    try:
        async with session.get(f"{root_url}/metrics", timeout=timeout) as response:
            if response.status == 200:
                for line in (await response.text()).splitlines():
                    if line.startswith("vllm:cache_config_info{"):
                        labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
                        blocks, size = labels.get("num_gpu_blocks"), labels.get("block_size")
                        if blocks and size and blocks.isdigit() and size.isdigit():
                            return int(blocks) * int(size), f"/metrics: {blocks} blocks x {size} tokens"
    except (aiohttp.ClientError, TimeoutError, UnicodeDecodeError):
        pass
    return None
