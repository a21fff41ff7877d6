"""A model server that reads requests the way vLLM does: FastAPI and pydantic in lax mode.

Numeric strings and whole floats become integers, ``"true"`` becomes true, duplicate keys
keep the last value (``json.loads``), ``max_completion_tokens`` is preferred over
``max_tokens``, unknown fields are ignored, and the path is routed as uvicorn decodes it.
It generates exactly ``n`` x the limit tokens (``DEFAULT_LIMIT`` without one) and reports
them in ``usage``; ``received`` holds what it read of every request it served, ``usage``
what it reported, so a test compares them with what the sidecar metered.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict

DEFAULT_LIMIT = 300  # vLLM's default is what the context leaves: large


class StreamOptions(BaseModel):
    include_usage: bool | None = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    n: int | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None


class ChatRequest(_Common):
    messages: list[dict[str, Any]]
    max_completion_tokens: int | None = None


class CompletionRequest(_Common):
    prompt: str | list[Any]


@dataclass
class Received:
    path: str
    limit: int
    n: int
    stream: bool
    prompt: int
    generation: int


@dataclass
class VllmLike:
    received: list[Received] = field(default_factory=list)
    port: int = 0
    cancelled: int = 0  # requests whose client went away while they were generating
    delay_s: float = 0.0  # per generated token, non-streamed requests included
    _server: uvicorn.Server | None = None
    _task: asyncio.Task[None] | None = None

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(body: ChatRequest, request: Request) -> Any:
            limit = body.max_completion_tokens or body.max_tokens or DEFAULT_LIMIT
            return await self._answer(request, body, limit, chat=True)

        @app.post("/v1/completions")
        async def completions(body: CompletionRequest, request: Request) -> Any:
            return await self._answer(request, body, body.max_tokens or DEFAULT_LIMIT, chat=False)

        return app

    async def _answer(self, request: Request, body: _Common, limit: int, *, chat: bool) -> Any:
        n = body.n or 1
        prompt = len(await request.body()) // 8 + 3
        generation = limit * n
        self.received.append(Received(request.url.path, limit, n, bool(body.stream), prompt, generation))
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": generation,
            "total_tokens": prompt + generation,
        }
        if not body.stream:
            if not await self._generated(request, self.delay_s * limit):
                self.cancelled += 1
                return JSONResponse({"error": "client gone"}, status_code=499)
            key = "message" if chat else "text"
            text = "t " * limit
            choices = [
                {"index": i, key: {"role": "assistant", "content": text} if chat else text} for i in range(n)
            ]
            return JSONResponse({"id": "x", "object": "chat.completion", "choices": choices, "usage": usage})
        include = bool(body.stream_options and body.stream_options.include_usage)

        async def events() -> AsyncIterator[bytes]:
            for _ in range(limit):
                for i in range(n):
                    delta = {"delta": {"content": "t "}} if chat else {"text": "t "}
                    doc: dict[str, Any] = {"object": "chunk", "choices": [{"index": i, **delta}]}
                    if include:
                        doc["usage"] = None
                    yield f"data: {json.dumps(doc)}\n\n".encode()
            if include:
                yield f"data: {json.dumps({'object': 'chunk', 'choices': [], 'usage': usage})}\n\n".encode()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @staticmethod
    async def _generated(request: Request, seconds: float) -> bool:
        """Generate for ``seconds``; False when the client went away first (vLLM's
        ``with_cancellation``: the request is aborted on the disconnect)."""
        if seconds <= 0:
            return True

        async def disconnect() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        work = asyncio.create_task(asyncio.sleep(seconds))
        gone = asyncio.create_task(disconnect())
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        for task in (work, gone):
            task.cancel()
        return not gone.done() or gone.cancelled()

    @property
    def usage_total(self) -> int:
        return sum(r.prompt + r.generation for r in self.received)

    async def start(self) -> str:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app(), log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        for _ in range(500):  # uvicorn says it started only through this flag
            if self._server.started:
                break
            await asyncio.sleep(0.01)
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
