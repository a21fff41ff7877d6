"""A fake OpenAI-compatible model server for the sidecar's tests and benchmark.

Deterministic: prompt tokens are a function of the request body, generated tokens of
``max_tokens`` (or ``X-Fake-Tokens``). Behaviour is chosen per request by headers, which
the sidecar forwards unchanged:

    X-Fake-Tokens: N          tokens generated per choice (default: max_tokens or 5)
    X-Fake-Usage: 0           never report usage (a server without usage support)
    X-Fake-Per-Chunk: K       tokens per streamed chunk (speculative decoding, merges)
    X-Fake-Delay: S           seconds before each streamed chunk
    X-Fake-First-Delay: S     seconds before the first chunk / the response
    X-Fake-Fail: status       answer this status with an OpenAI error body
    X-Fake-Fail: mid          stream half the tokens, then drop the connection
    X-Fake-Malformed: 1       stream garbage that is not SSE JSON
    X-Fake-Spaces: 1          JSON with ", " and ": " separators

``reported`` holds the usage the server reported, so a test can compare the sidecar's
counts with the truth; ``disconnects`` counts streams whose client went away.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from dataclasses import dataclass
from typing import Any

from aiohttp import web


@dataclass
class Totals:
    prompt: int = 0
    generation: int = 0
    requests: int = 0


def prompt_tokens_of(doc: dict[str, Any]) -> int:
    """The fake's tokenizer: one token per 3 bytes of prompt text, plus 7."""
    text = ""
    if isinstance(doc.get("messages"), list):
        text = "".join(str(m.get("content", "")) for m in doc["messages"] if isinstance(m, dict))
    for key in ("prompt", "input", "instructions"):
        if key in doc:
            text += json.dumps(doc[key])
    return len(text.encode()) // 3 + 7


class FakeUpstream:
    def __init__(self) -> None:
        self.reported = Totals()
        self.disconnects = 0
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        self.models = ["fake"]  # what /v1/models lists
        self.app = web.Application()
        self.app.router.add_post("/v1/chat/completions", self.chat)
        self.app.router.add_post("/v1/completions", self.completions)
        self.app.router.add_post("/v1/embeddings", self.embeddings)
        self.app.router.add_post("/v1/responses", self.responses)
        self.app.router.add_get("/metrics", self.metrics)
        self.app.router.add_get("/v1/models", self.list_models)
        self.app.router.add_route("*", "/echo/{tail:.*}", self.echo)
        # what GET /metrics answers: a test may set a model server's gauges here
        self.metrics_text = "# fake model server metrics\nvllm_requests_total 1\n"
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self, port: int = 0, ssl_context: ssl.SSLContext | None = None) -> str:
        """Serve on ``port`` (0: a free one), over TLS with ``ssl_context``; the base URL."""
        self._runner = web.AppRunner(self.app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port, ssl_context=ssl_context)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return f"{'https' if ssl_context else 'http'}://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # -- helpers

    @staticmethod
    def _dumps(request: web.Request, obj: object) -> str:
        if request.headers.get("X-Fake-Spaces") == "1":
            return json.dumps(obj)
        return json.dumps(obj, separators=(",", ":"))

    def _report(self, prompt: int, generation: int) -> dict[str, int]:
        self.reported.prompt += prompt
        self.reported.generation += generation
        self.reported.requests += 1
        return {"prompt_tokens": prompt, "completion_tokens": generation, "total_tokens": prompt + generation}

    async def _doc(self, request: web.Request) -> dict[str, Any] | web.Response:
        body = await request.read()
        self.requests.append((request.method, request.path, dict(request.headers), body))
        fail = request.headers.get("X-Fake-Fail", "")
        if fail.isdigit():
            error = {
                "error": {"message": "fake failure", "type": "server_error", "param": None, "code": None}
            }
            return web.json_response(error, status=int(fail))
        try:
            doc = json.loads(body)
        except ValueError:
            return web.json_response(
                {"error": {"message": "bad json", "type": "invalid_request_error"}}, status=400
            )
        if not isinstance(doc, dict):
            return web.json_response(
                {"error": {"message": "not an object", "type": "invalid_request_error"}}, status=400
            )
        return doc

    @staticmethod
    def _tokens(request: web.Request, doc: dict[str, Any], key: str = "max_tokens") -> int:
        if "X-Fake-Tokens" in request.headers:
            return int(request.headers["X-Fake-Tokens"])
        value = doc.get("max_completion_tokens") or doc.get(key)
        return int(value) if isinstance(value, int) else 5

    # -- endpoints

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def _generate(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        doc = await self._doc(request)
        if isinstance(doc, web.Response):
            return doc
        await asyncio.sleep(float(request.headers.get("X-Fake-First-Delay", "0")))
        n_value = doc.get("n")
        n = n_value if isinstance(n_value, int) else 1
        tokens = self._tokens(request, doc)
        prompt = prompt_tokens_of(doc)
        usage_ok = request.headers.get("X-Fake-Usage") != "0"
        base = {
            "id": "cmpl-fake",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": 1700000000,  # fixed, so two runs give the same bytes
            "model": doc.get("model", "fake"),
        }
        if not doc.get("stream"):
            if chat:
                choices = [
                    {
                        "index": i,
                        "message": {"role": "assistant", "content": "".join(f"t{j} " for j in range(tokens))},
                        "finish_reason": "length",
                    }
                    for i in range(n)
                ]
            else:
                choices = [
                    {"index": i, "text": "".join(f"t{j} " for j in range(tokens)), "finish_reason": "length"}
                    for i in range(n)
                ]
            out: dict[str, Any] = {**base, "object": "chat.completion" if chat else "text_completion"}
            out["choices"] = choices
            if usage_ok:
                out["usage"] = self._report(prompt, tokens * n)
            return web.Response(text=self._dumps(request, out), content_type="application/json")
        return await self._stream(
            request, doc, base, chat=chat, n=n, tokens=tokens, prompt=prompt, usage_ok=usage_ok
        )

    async def _stream(
        self,
        request: web.Request,
        doc: dict[str, Any],
        base: dict[str, Any],
        *,
        chat: bool,
        n: int,
        tokens: int,
        prompt: int,
        usage_ok: bool,
    ) -> web.StreamResponse:
        options = doc.get("stream_options")
        include_usage = usage_ok and isinstance(options, dict) and options.get("include_usage") is True
        per_chunk = int(request.headers.get("X-Fake-Per-Chunk", "1"))
        delay = float(request.headers.get("X-Fake-Delay", "0"))
        fail_mid = request.headers.get("X-Fake-Fail") == "mid"
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)

        async def send(choices: list[dict[str, Any]], **extra: Any) -> None:
            chunk = {**base, "choices": choices, **extra}
            if include_usage and "usage" not in extra:
                chunk["usage"] = None
            await response.write(f"data: {self._dumps(request, chunk)}\n\n".encode())

        try:
            if request.headers.get("X-Fake-Malformed") == "1":
                await response.write(b"data: {not json\n\nthis is not sse at all\n\ndata: [1,2]\n\n")
                await response.write(b"data: [DONE]\n\n")
                await response.write_eof()
                return response
            if chat:
                await send([{"index": i, "delta": {"role": "assistant", "content": ""}} for i in range(n)])
            await response.write(b": keep-alive\n\n")
            sent = 0
            while sent < tokens:
                step = min(per_chunk, tokens - sent)
                if fail_mid and sent >= tokens // 2:
                    assert request.transport is not None
                    request.transport.abort()
                    return response
                if delay:
                    await asyncio.sleep(delay)
                text = "".join(f"t{sent + j} " for j in range(step))
                for i in range(n):
                    choice = {"index": i, "delta": {"content": text}} if chat else {"index": i, "text": text}
                    await send([{**choice, "finish_reason": None}])
                sent += step
            for i in range(n):
                done = {"index": i, "delta": {}} if chat else {"index": i, "text": ""}
                await send([{**done, "finish_reason": "length"}])
            if include_usage:
                await send([], usage=self._report(prompt, tokens * n))
            elif usage_ok:
                # Counted by the server all the same; the client did not ask to see it.
                self._report(prompt, tokens * n)
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except (asyncio.CancelledError, ConnectionResetError):
            self.disconnects += 1
            raise
        return response

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        doc = await self._doc(request)
        if isinstance(doc, web.Response):
            return doc
        inputs = doc.get("input")
        count = len(inputs) if isinstance(inputs, list) else 1
        out: dict[str, Any] = {
            "object": "list",
            "data": [{"object": "embedding", "index": i, "embedding": [0.1, 0.2]} for i in range(count)],
            "model": doc.get("model", "fake"),
        }
        if request.headers.get("X-Fake-Usage") != "0":
            prompt = prompt_tokens_of(doc)
            self._report(prompt, 0)
            out["usage"] = {"prompt_tokens": prompt, "total_tokens": prompt}
        return web.json_response(out)

    async def responses(self, request: web.Request) -> web.StreamResponse:
        doc = await self._doc(request)
        if isinstance(doc, web.Response):
            return doc
        tokens = self._tokens(request, doc, "max_output_tokens")
        prompt = prompt_tokens_of(doc)
        usage = {"input_tokens": prompt, "output_tokens": tokens, "total_tokens": prompt + tokens}
        final = {
            "id": "resp-fake",
            "object": "response",
            "status": "completed",
            "output": [
                {
                    "type": "message",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": "".join(f"t{j} " for j in range(tokens))}],
                }
            ],
            "usage": usage,
        }
        self._report(prompt, tokens)
        if not doc.get("stream"):
            return web.json_response(final)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'event: response.created\ndata: {"type":"response.created"}\n\n')
        for j in range(tokens):
            event = {"type": "response.output_text.delta", "delta": f"t{j} "}
            await response.write(f"event: response.output_text.delta\ndata: {json.dumps(event)}\n\n".encode())
        done = {"type": "response.completed", "response": final}
        await response.write(f"event: response.completed\ndata: {json.dumps(done)}\n\n".encode())
        await response.write_eof()
        return response

    async def list_models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"object": "list", "data": [{"id": m, "object": "model"} for m in self.models]}
        )

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=self.metrics_text)

    async def echo(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items()}
        return web.json_response(
            {
                "method": request.method,
                "path": request.path_qs,
                "headers": headers,
                "body": body.decode("latin-1"),
            },
            status=int(request.query.get("status", "200")),
            headers={"X-Echo": "1"},
        )


def main() -> None:
    """``python -m tests.sidecar.fake_upstream --port N``: the fake as a process of its own (a
    model server that tests start and kill)."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    port = parser.parse_args().port

    async def serve() -> None:
        fake = FakeUpstream()
        await fake.start(port)
        await asyncio.Event().wait()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
