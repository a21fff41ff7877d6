"""A simulated OpenAI-compatible model server with a fixed token capacity.

One replica does ``capacity`` units of work per second, shared equally by the requests
it has admitted (at most ``max_batch``; the rest wait in a FIFO queue, as in a
continuous-batching server). A prompt token costs ``prompt_cost`` units, a generated
token ``generation_cost`` (1 and 10 by default: prefill is cheap per token), so the
replica serves ``capacity`` weighted tokens/s with weights (prompt_cost, generation_cost).
Prompt tokens are whitespace-separated words; each generated token is one word. ``usage``
is exact for its own counting.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

# What a prompt and a generated token cost the simulated replica: the demo's weights, in the
# convention of every command (a prompt token 1, a generated token what it costs in prompt
# tokens).
PROMPT_WEIGHT = 1.0
GENERATION_WEIGHT = 10.0


@dataclass
class _Job:
    prompt: int
    generate: int
    prefill_left: float
    emitted: int = 0
    credit: float = 0.0
    tokens: asyncio.Queue[int | None] = field(default_factory=asyncio.Queue)


@dataclass(frozen=True)
class _Reply:
    """What every answer to one request repeats: its id, time, model, API and usage."""

    id: str
    created: int
    model: str
    chat: bool
    usage: dict[str, int]

    def envelope(self, kind: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }


async def _answer(job: _Job, reply: _Reply) -> web.Response:
    """The whole answer, once every token of ``job`` is generated."""
    while await job.tokens.get() is not None:
        pass
    text = " tok" * job.generate
    choice: dict[str, Any] = (
        {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}
        if reply.chat
        else {"index": 0, "text": text, "finish_reason": "length"}
    )
    kind = "chat.completion" if reply.chat else "text_completion"
    return web.json_response({**reply.envelope(kind, [choice]), "usage": reply.usage})


async def _stream(request: web.Request, job: _Job, reply: _Reply, *, with_usage: bool) -> web.StreamResponse:
    """Server-sent events: a chunk a token as ``job`` generates it, the usage chunk when
    asked for, then ``[DONE]``."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    kind = "chat.completion.chunk" if reply.chat else "text_completion"

    async def send(payload: dict[str, Any]) -> None:
        await response.write(b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n")

    while (n := await job.tokens.get()) is not None:
        last = n == job.generate
        finish = "length" if last else None
        choice: dict[str, Any] = (
            {"index": 0, "delta": {"content": " tok"}, "finish_reason": finish}
            if reply.chat
            else {"index": 0, "text": " tok", "finish_reason": finish}
        )
        await send(reply.envelope(kind, [choice]))
    if with_usage:
        await send({**reply.envelope(kind, []), "usage": reply.usage})
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


class SimulatedModel:
    def __init__(
        self,
        *,
        capacity: float,
        prompt_cost: float = PROMPT_WEIGHT,
        generation_cost: float = GENERATION_WEIGHT,
        max_batch: int = 32,
        tick_s: float = 0.02,
        model: str = "sim-llm",
    ) -> None:
        self.capacity = capacity
        self.prompt_cost = prompt_cost
        self.generation_cost = generation_cost
        self.max_batch = max_batch
        self.tick_s = tick_s
        self.model = model
        self.queue: deque[_Job] = deque()
        self.active: list[_Job] = []
        self.served_prompt = 0
        self.served_generation = 0
        self._task: asyncio.Task[None] | None = None

    # -- scheduling ------------------------------------------------------------------

    async def run(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(self.tick_s)
            now = time.monotonic()
            budget, last = self.capacity * (now - last), now
            while self.queue and len(self.active) < self.max_batch:
                self.active.append(self.queue.popleft())
            if not self.active:
                continue
            share = budget / len(self.active)
            for job in list(self.active):
                work = share
                if job.prefill_left > 0:
                    used = min(work, job.prefill_left * self.prompt_cost)
                    job.prefill_left -= used / self.prompt_cost
                    work -= used
                    if job.prefill_left <= 1e-9:
                        job.prefill_left = 0
                        self.served_prompt += job.prompt
                if job.prefill_left == 0:
                    job.credit += work
                    while job.credit >= self.generation_cost and job.emitted < job.generate:
                        job.credit -= self.generation_cost
                        job.emitted += 1
                        self.served_generation += 1
                        job.tokens.put_nowait(job.emitted)
                    if job.emitted >= job.generate:
                        job.tokens.put_nowait(None)
                        self.active.remove(job)

    @property
    def backlog(self) -> int:
        return len(self.queue) + len(self.active)

    # -- HTTP ------------------------------------------------------------------------

    def app(self) -> web.Application:
        """The HTTP app. Run it with ``handler_cancellation=True``: a request whose client
        leaves is then dropped at once, as a real server aborts it."""
        app = web.Application(client_max_size=64 << 20)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.cleanup_ctx.append(self._scheduler)
        return app

    async def _scheduler(self, _: web.Application) -> Any:
        self._task = asyncio.create_task(self.run())
        yield
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _models(self, _: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model"}]})

    async def _health(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "queued": len(self.queue), "active": len(self.active)})

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        text = " ".join(str(m.get("content", "")) for m in body.get("messages", []) if isinstance(m, dict))
        return await self._serve(request, body, len(text.split()), chat=True)

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        return await self._serve(request, body, len(str(body.get("prompt", "")).split()), chat=False)

    async def _serve(
        self, request: web.Request, body: dict[str, Any], prompt: int, *, chat: bool
    ) -> web.StreamResponse:
        generate = int(body.get("max_tokens") or body.get("max_completion_tokens") or 16)
        job = _Job(prompt=prompt, generate=max(1, generate), prefill_left=float(prompt))
        self.queue.append(job)
        reply = _Reply(
            id=f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:12]}",
            created=int(time.time()),
            model=self.model,
            chat=chat,
            usage={
                "prompt_tokens": prompt,
                "completion_tokens": job.generate,
                "total_tokens": prompt + job.generate,
            },
        )
        try:
            if not body.get("stream"):
                return await _answer(job, reply)
            options = body.get("stream_options") or {}
            with_usage = isinstance(options, dict) and bool(options.get("include_usage"))
            return await _stream(request, job, reply, with_usage=with_usage)
        except ConnectionResetError:
            # the client (or the sidecar, for it) left mid-stream; nothing more to send
            return web.Response(status=499)
        finally:
            # a client that left: the replica stops working on its request
            if job in self.queue:
                self.queue.remove(job)
            if job in self.active:
                self.active.remove(job)
