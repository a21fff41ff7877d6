"""A model server that answers what the test scripted, and an honest model of generation.

``ScriptedUpstream`` replays, for a request carrying ``X-Script: <id>``, the response the
test registered under that id: a JSON body, or SSE events (the usage event only when the
request asked for it, as OpenAI and llama-server do). It serves on its own thread's event
loop together with a sidecar, so that synchronous clients (the ``openai`` SDK) and
hypothesis can drive both.

``Generation`` is an honest server's answer as a byte-level tokenizer produces it: every
visible token is at least one byte of the text that reaches the client; some tokens show
no text (end of turn, tool-call markers, a stop string cut from the text, hidden
reasoning). ``render_*`` turn one into the bytes of each API's response.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import web

T = TypeVar("T")


class LoopThread:
    """An event loop on a thread of its own; ``run`` waits for a coroutine on it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@dataclass
class Script:
    json_body: dict[str, Any] | None = None
    events: list[dict[str, Any]] = field(default_factory=list)  # SSE data, in order
    usage_event: dict[str, Any] | None = None  # sent when the request asks for usage
    event_names: bool = False  # Responses API: "event: <type>" lines


class ScriptedUpstream:
    def __init__(self) -> None:
        self.scripts: dict[str, Script] = {}
        self.bodies: dict[str, bytes] = {}
        self.app = web.Application()
        self.app.router.add_post("/v1/{tail:.*}", self.answer)
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self) -> str:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def answer(self, request: web.Request) -> web.StreamResponse:
        key = request.headers["X-Script"]
        body = await request.read()
        self.bodies[key] = body
        script = self.scripts.pop(key)
        if script.json_body is not None:
            return web.json_response(script.json_body)
        doc = json.loads(body)
        options = doc.get("stream_options")
        wants_usage = isinstance(options, dict) and options.get("include_usage") is True
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        events = list(script.events)
        if script.usage_event is not None and (wants_usage or script.event_names):
            events.append(script.usage_event)
        for event in events:
            data = json.dumps(event, ensure_ascii=False)
            name = f"event: {event['type']}\n" if script.event_names else ""
            await response.write(f"{name}data: {data}\n\n".encode())
        if not script.event_names:
            await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


# -- an honest generation ---------------------------------------------------------------


@dataclass
class ToolCall:
    name: list[str]  # its tokens
    arguments: list[str]
    markers: int  # tokens of the call's wrapper, which show no text


@dataclass
class Choice:
    content: list[str]  # visible tokens, each a non-empty piece of text
    reasoning: list[str] = field(default_factory=list)  # visible reasoning (reasoning_content)
    tools: list[ToolCall] = field(default_factory=list)
    silent: int = 1  # end of turn and other tokens without text
    cut: int = 0  # tokens of a stop string, cut from the text

    def tokens(self) -> int:
        calls = sum(len(t.name) + len(t.arguments) + t.markers for t in self.tools)
        return len(self.content) + len(self.reasoning) + calls + self.silent + self.cut


@dataclass
class Generation:
    choices: list[Choice]
    hidden_reasoning: int  # reasoning tokens reported in the usage's details, never shown
    hidden_choices: list[int] = field(default_factory=list)  # best_of: generated, not returned
    prompt_tokens: int = 0

    def completion_tokens(self) -> int:
        return sum(c.tokens() for c in self.choices) + self.hidden_reasoning + sum(self.hidden_choices)


def _groups(tokens: list[str], size: int) -> list[str]:
    return ["".join(tokens[i : i + size]) for i in range(0, len(tokens), size)]


def _chat_usage(g: Generation) -> dict[str, Any]:
    completion = g.completion_tokens()
    usage: dict[str, Any] = {
        "prompt_tokens": g.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": g.prompt_tokens + completion,
    }
    if g.hidden_reasoning:
        usage["completion_tokens_details"] = {"reasoning_tokens": g.hidden_reasoning}
    return usage


def _tool_calls(choice: Choice) -> list[dict[str, Any]]:
    return [
        {
            "id": f"call_{i}",
            "type": "function",
            "function": {"name": "".join(t.name), "arguments": "".join(t.arguments)},
        }
        for i, t in enumerate(choice.tools)
    ]


def render_chat(g: Generation, model: str, *, stream: bool, per_chunk: int) -> Script:
    base = {"id": "chatcmpl-s", "created": 1700000000, "model": model}
    usage = _chat_usage(g)
    if not stream:
        choices = []
        for i, c in enumerate(g.choices):
            message: dict[str, Any] = {"role": "assistant", "content": "".join(c.content) or None}
            if c.reasoning:
                message["reasoning_content"] = "".join(c.reasoning)
            if c.tools:
                message["tool_calls"] = _tool_calls(c)
            choices.append({"index": i, "message": message, "finish_reason": "stop"})
        return Script({**base, "object": "chat.completion", "choices": choices, "usage": usage})
    chunk = {**base, "object": "chat.completion.chunk"}
    events: list[dict[str, Any]] = []
    for i, c in enumerate(g.choices):
        events.append({**chunk, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}}]})
        for text in _groups(c.reasoning, per_chunk):
            events.append({**chunk, "choices": [{"index": i, "delta": {"reasoning_content": text}}]})
        for text in _groups(c.content, per_chunk):
            events.append({**chunk, "choices": [{"index": i, "delta": {"content": text}}]})
        for k, t in enumerate(c.tools):
            function = {"name": "".join(t.name), "arguments": ""}
            head = {"index": k, "id": f"call_{k}", "type": "function", "function": function}
            events.append({**chunk, "choices": [{"index": i, "delta": {"tool_calls": [head]}}]})
            for text in _groups(t.arguments, per_chunk):
                call = {"index": k, "function": {"arguments": text}}
                events.append({**chunk, "choices": [{"index": i, "delta": {"tool_calls": [call]}}]})
        events.append({**chunk, "choices": [{"index": i, "delta": {}, "finish_reason": "stop"}]})
    return Script(events=events, usage_event={**chunk, "choices": [], "usage": usage})


def render_completion(g: Generation, model: str, *, stream: bool, per_chunk: int) -> Script:
    base = {"id": "cmpl-s", "object": "text_completion", "created": 1700000000, "model": model}
    usage = _chat_usage(g)
    if not stream:
        choices = [
            {"index": i, "text": "".join(c.content), "finish_reason": "stop"} for i, c in enumerate(g.choices)
        ]
        return Script({**base, "choices": choices, "usage": usage})
    events = [
        {**base, "choices": [{"index": i, "text": text, "finish_reason": None}]}
        for i, c in enumerate(g.choices)
        for text in _groups(c.content, per_chunk)
    ]
    events += [
        {**base, "choices": [{"index": i, "text": "", "finish_reason": "stop"}]}
        for i in range(len(g.choices))
    ]
    return Script(events=events, usage_event={**base, "choices": [], "usage": usage})


def render_responses(g: Generation, model: str, *, stream: bool, per_chunk: int) -> Script:
    c = g.choices[0]
    completion = g.completion_tokens()
    usage: dict[str, Any] = {
        "input_tokens": g.prompt_tokens,
        "output_tokens": completion,
        "total_tokens": g.prompt_tokens + completion,
        "output_tokens_details": {"reasoning_tokens": g.hidden_reasoning},
    }
    output: list[dict[str, Any]] = []
    if c.reasoning:
        summary = [{"type": "summary_text", "text": "".join(c.reasoning)}]
        output.append({"type": "reasoning", "id": "rs_1", "summary": summary})
    for k, t in enumerate(c.tools):
        output.append(
            {
                "type": "function_call",
                "id": f"fc_{k}",
                "call_id": f"call_{k}",
                "name": "".join(t.name),
                "arguments": "".join(t.arguments),
                "status": "completed",
            }
        )
    text = "".join(c.content)
    output.append(
        {
            "type": "message",
            "id": "msg_1",
            "role": "assistant",
            "status": "completed",
            "content": [{"type": "output_text", "text": text, "annotations": []}],
        }
    )
    response = {
        "id": "resp_s",
        "object": "response",
        "created_at": 1700000000,
        "model": model,
        "status": "completed",
        "output": output,
        "usage": usage,
    }
    if not stream:
        return Script(response)
    events: list[dict[str, Any]] = [{"type": "response.created", "response": {**response, "output": []}}]
    for piece in _groups(c.reasoning, per_chunk):
        events.append({"type": "response.reasoning_summary_text.delta", "item_id": "rs_1", "delta": piece})
    for k, t in enumerate(c.tools):
        item = {**output[len(output) - len(c.tools) - 1 + k], "arguments": ""}
        events.append({"type": "response.output_item.added", "output_index": k, "item": item})
        for piece in _groups(t.arguments, per_chunk):
            events.append(
                {"type": "response.function_call_arguments.delta", "item_id": f"fc_{k}", "delta": piece}
            )
    for piece in _groups(c.content, per_chunk):
        events.append({"type": "response.output_text.delta", "item_id": "msg_1", "delta": piece})
    events.append({"type": "response.output_text.done", "item_id": "msg_1", "text": text})
    return Script(
        events=events, usage_event={"type": "response.completed", "response": response}, event_names=True
    )
