"""A fake hosted provider: Anthropic's Messages API beside the OpenAI endpoints of ``FakeUpstream``.

``POST /v1/messages`` answers as Anthropic's API does: a ``message`` object, or with
``"stream": true`` the event sequence ``message_start`` (input and cache tokens, one output
token), ``content_block_start``, ``ping``, ``content_block_delta`` per token,
``content_block_stop``, ``message_delta`` (cumulative ``output_tokens``), ``message_stop``.
``POST /v1/messages/count_tokens`` answers ``{"input_tokens": N}``. Errors are in
Anthropic's shape. Requests without ``anthropic-version`` or an API key (``x-api-key`` or
``Authorization: Bearer``) get 400 / 401, as from the real API.

Per-request behaviour by header (forwarded by the sidecar unchanged):

    X-Fake-Tokens: N         output tokens (default: max_tokens)
    X-Fake-Cache-Read: N     input tokens read from the prompt cache
    X-Fake-Cache-Write: N    input tokens written to the prompt cache
    X-Fake-Tool: 1           the answer is a tool call: its input streams as input_json_delta
    X-Fake-Fail: status      answer this status with an Anthropic error
    X-Fake-Fail: mid         stream half the tokens, then drop the connection
    X-Fake-Input-Repeat: 1   message_delta repeats the input fields (newer API versions do)

``anthropic`` holds the usage reported (input = uncached + cache read + cache write), as
``reported`` does for the OpenAI endpoints; ``keys`` every API key the fake received.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from tests.sidecar.fake_upstream import FakeUpstream, Totals, prompt_tokens_of


def _event(doc: dict[str, Any], *, spaced: bool = False) -> bytes:
    separators = (", ", ": ") if spaced else (",", ":")
    return f"event: {doc['type']}\ndata: {json.dumps(doc, separators=separators)}\n\n".encode()


def error(status: int, type_: str, message: str) -> web.Response:
    body = {"type": "error", "error": {"type": type_, "message": message}}
    return web.json_response(body, status=status)


class FakeAnthropic(FakeUpstream):
    def __init__(self) -> None:
        super().__init__()
        self.anthropic = Totals()
        self.keys: list[str] = []
        self.app.router.add_post("/v1/messages", self.messages)
        self.app.router.add_post("/v1/messages/count_tokens", self.count_tokens)

    async def _message_doc(
        self, request: web.Request, *, limit: bool = True
    ) -> dict[str, Any] | web.Response:
        body = await request.read()
        self.requests.append((request.method, request.path, dict(request.headers), body))
        key = request.headers.get("x-api-key") or request.headers.get("Authorization", "").removeprefix(
            "Bearer "
        )
        if not key:
            return error(401, "authentication_error", "x-api-key header is required")
        self.keys.append(key)
        if "anthropic-version" not in request.headers:
            return error(400, "invalid_request_error", "anthropic-version: header is required")
        fail = request.headers.get("X-Fake-Fail", "")
        if fail.isdigit():
            return error(int(fail), "overloaded_error" if fail == "529" else "api_error", "fake failure")
        try:
            doc = json.loads(body)
        except ValueError:
            return error(400, "invalid_request_error", "bad json")
        if not isinstance(doc, dict):
            return error(400, "invalid_request_error", "expected an object")
        if limit and not isinstance(doc.get("max_tokens"), int):
            return error(400, "invalid_request_error", "max_tokens: Field required")
        return doc

    async def count_tokens(self, request: web.Request) -> web.Response:
        doc = await self._message_doc(request, limit=False)
        if isinstance(doc, web.Response):
            return doc
        return web.json_response({"input_tokens": prompt_tokens_of(doc)})

    async def messages(self, request: web.Request) -> web.StreamResponse:
        doc = await self._message_doc(request)
        if isinstance(doc, web.Response):
            return doc
        headers = request.headers
        tokens = int(headers.get("X-Fake-Tokens", doc["max_tokens"]))
        read = int(headers.get("X-Fake-Cache-Read", "0"))
        write = int(headers.get("X-Fake-Cache-Write", "0"))
        fresh = prompt_tokens_of(doc)
        tool = headers.get("X-Fake-Tool") == "1"
        usage = {
            "input_tokens": fresh,
            "cache_creation_input_tokens": write,
            "cache_read_input_tokens": read,
            "output_tokens": tokens,
        }
        message: dict[str, Any] = {
            "id": "msg_fake",
            "type": "message",
            "role": "assistant",
            "model": doc.get("model", "fake"),
            "content": [],
            "stop_reason": "max_tokens",
            "stop_sequence": None,
            "usage": usage,
        }
        pieces = [f'{{"n":{j}' if j == 0 else f',"t{j}":1' for j in range(tokens)] if tool else []
        if tool and pieces:
            pieces[-1] += "}"
        texts = pieces or [f"t{j} " for j in range(tokens)]
        self.anthropic.prompt += fresh + read + write
        self.anthropic.generation += tokens
        self.anthropic.requests += 1
        if not doc.get("stream"):
            if tool:
                block = {
                    "type": "tool_use",
                    "id": "toolu_fake",
                    "name": "f",
                    "input": json.loads("".join(texts)),
                }
            else:
                block = {"type": "text", "text": "".join(texts)}
            message["content"] = [block]
            return web.json_response(message)
        return await self._message_stream(request, message, texts, tool)

    async def _message_stream(
        self, request: web.Request, message: dict[str, Any], texts: list[str], tool: bool
    ) -> web.StreamResponse:
        usage = message["usage"]
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        start = {**message, "usage": {**usage, "output_tokens": 1}, "stop_reason": None}
        await response.write(_event({"type": "message_start", "message": start}))
        block: dict[str, Any] = (
            {"type": "tool_use", "id": "toolu_fake", "name": "f", "input": {}}
            if tool
            else {"type": "text", "text": ""}
        )
        await response.write(_event({"type": "content_block_start", "index": 0, "content_block": block}))
        await response.write(_event({"type": "ping"}, spaced=True))
        fail_mid = request.headers.get("X-Fake-Fail") == "mid"
        for j, text in enumerate(texts):
            if fail_mid and j >= len(texts) // 2:
                assert request.transport is not None
                request.transport.abort()
                return response
            delta = (
                {"type": "input_json_delta", "partial_json": text}
                if tool
                else {"type": "text_delta", "text": text}
            )
            await response.write(_event({"type": "content_block_delta", "index": 0, "delta": delta}))
        await response.write(_event({"type": "content_block_stop", "index": 0}))
        final: dict[str, Any] = {"output_tokens": usage["output_tokens"]}
        if request.headers.get("X-Fake-Input-Repeat") == "1":
            final = dict(usage)
        delta_event = {
            "type": "message_delta",
            "delta": {"stop_reason": "tool_use" if tool else "max_tokens", "stop_sequence": None},
            "usage": final,
        }
        await response.write(_event(delta_event))
        await response.write(_event({"type": "message_stop"}))
        await response.write_eof()
        return response
