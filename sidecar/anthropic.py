"""Anthropic's Messages API (``POST /v1/messages``): what the meter needs from its shapes (pure).

The second wire format beside OpenAI's (openai.py), read into the same ``ParsedRequest``,
``Chunk``, ``Usage`` and ``Complete``, so the proxy, the accounting and the policies treat
both alike (wires.py says which format a path speaks). Nothing here raises on bad input.

Usage: ``input_tokens`` counts only the input after the last cache breakpoint; the input
read from the prompt cache (``cache_read_input_tokens``) and written to it
(``cache_creation_input_tokens``) come beside it. The prompt counted is all three together,
every input token the model attended to; ``Usage.cache_read`` and ``cache_write`` keep
the split, for money budgets that price the three differently.

A stream says its usage twice: ``message_start`` has the input and the first output
tokens, ``message_delta`` the output so far (cumulative; newer API versions repeat the
input fields there). The first is a usage not yet final (``Usage.final``): a stream that
ends before ``message_delta`` is counted at least at the pieces that passed.
"""

from __future__ import annotations

import json
from typing import Any

from sidecar.jsonbody import Layout
from sidecar.openai import (  # JSON read and counts checked alike in both formats
    Chunk,
    Complete,
    Kind,
    ParsedRequest,
    Usage,
    json_or_none,
    token_count,
)

# The error types of Anthropic's API by HTTP status; other codes take their class's.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}

# Content deltas that carry generated tokens (``signature_delta`` and ``citations_delta`` do not).
_DELTA_TEXT = {"text_delta": "text", "input_json_delta": "partial_json", "thinking_delta": "thinking"}


def _block_texts(content: object) -> list[str]:
    """Text a message's content holds: a string, or blocks (text, tool use and results)."""
    if isinstance(content, str):
        return [content]
    texts: list[str] = []
    if isinstance(content, list):
        for block in content:
            if not isinstance(block, dict):
                continue
            for key in ("text", "thinking"):
                if isinstance(value := block.get(key), str):
                    texts.append(value)
            if "input" in block:  # a tool call the assistant made
                texts.append(json.dumps(block["input"]))
            if "content" in block:  # a tool's result
                texts.extend(_block_texts(block["content"]))
    return texts


def parse_document(
    kind: Kind, doc: dict[str, Any], layout: Layout | None = None, limit: int | bool | None = False
) -> ParsedRequest:
    """What the meter needs from a decoded Messages request (``request_rules`` checked its
    types); ``limit``: the ``max_tokens`` it found, unless False."""
    model = doc.get("model")
    texts = _block_texts(doc.get("system"))
    messages = doc.get("messages")
    count = 0
    if isinstance(messages, list):
        count = len(messages)
        for message in messages:
            if isinstance(message, dict):
                texts.extend(_block_texts(message.get("content")))
    tools = doc.get("tools")
    if isinstance(tools, list) and tools:
        texts.append(json.dumps(tools))
    if limit is False:
        raw = doc.get("max_tokens")
        max_tokens = raw if token_count(raw) else None
    else:
        max_tokens = int(limit) if limit is not None else None
    return ParsedRequest(
        kind=kind,
        model=model if isinstance(model, str) and model else None,
        stream=doc.get("stream") is True,
        max_tokens=max_tokens,
        n=1,
        wants_usage=True,  # a stream always says its usage
        prompt_texts=tuple(texts),
        prompt_ids=0,
        messages=count,
        layout=layout,
    )


def usage_of(usage: object, previous: Usage | None = None, *, final: bool = True) -> Usage | None:
    """A ``usage`` object, each field it lacks (or has as null) taken from ``previous``;
    None when the input or the output is said nowhere."""
    if not isinstance(usage, dict):
        return previous
    fields = {
        key: token_count(usage.get(key))
        for key in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens", "output_tokens")
    }
    fresh, write, read, output = fields.values()
    if previous is not None:
        before_fresh = previous.prompt - previous.cache_read - previous.cache_write
        fresh = before_fresh if fresh is None else fresh
        write = previous.cache_write if write is None else write
        read = previous.cache_read if read is None else read
        output = previous.generation if output is None else output
    if fresh is None or output is None:
        return None
    write, read = write or 0, read or 0
    return Usage(fresh + write + read, output, cache_read=read, cache_write=write, final=final)


def parse_chunk(kind: Kind, data: str, previous: Usage | None = None) -> Chunk | None:
    """One event's data (its JSON names the event in ``type``); ``previous``: the usage the
    stream said before it. None when it is not the JSON the API streams."""
    doc = json_or_none(data)
    if not isinstance(doc, dict):
        return None
    type_ = doc.get("type")
    if type_ == "content_block_delta":
        delta = doc.get("delta")
        if not isinstance(delta, dict) or (key := _DELTA_TEXT.get(str(delta.get("type")))) is None:
            return Chunk()
        text = delta.get(key)
        return Chunk(1, (text,) if isinstance(text, str) and text else ())
    if type_ == "message_start":
        message = doc.get("message")
        raw = message.get("usage") if isinstance(message, dict) else None
        return Chunk(usage=usage_of(raw, previous, final=False))
    if type_ == "message_delta":
        return Chunk(usage=usage_of(doc.get("usage"), previous))
    if isinstance(type_, str):
        return Chunk()  # content_block_start/stop, message_stop, ping, error, and new ones
    return None


def parse_response(kind: Kind, body: bytes) -> Complete | None:
    doc = json_or_none(body)
    if not isinstance(doc, dict):
        return None
    model = doc.get("model")
    texts = tuple(t for t in _block_texts(doc.get("content")) if t)
    return Complete(usage_of(doc.get("usage")), texts, model if isinstance(model, str) else None)


def error_type(status: int) -> str:
    return ERROR_TYPES.get(status) or ("api_error" if status >= 500 else "invalid_request_error")


def error_body(status: int, message: str) -> bytes:
    """An error in Anthropic's shape, so its SDK raises its usual exception with our message."""
    doc = {"type": "error", "error": {"type": error_type(status), "message": message}}
    return json.dumps(doc, separators=(",", ":")).encode()


def _event(doc: dict[str, Any]) -> str:
    return f"event: {doc['type']}\ndata: {json.dumps(doc, separators=(',', ':'))}\n\n"


def stop_event(mode: str, message: str, generated: int) -> bytes:
    """The last events of a stream the sidecar ends: an ``error`` event (``mode="error"``,
    what the API sends when a stream fails, and the SDK raises), or a finish as if
    ``max_tokens`` had been reached: ``message_delta`` with ``stop_reason: "max_tokens"``
    and the ``generated`` pieces as output tokens, then ``message_stop``."""
    if mode == "error":
        return _event({"type": "error", "error": {"type": error_type(429), "message": message}}).encode()
    delta = {
        "type": "message_delta",
        "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
        "usage": {"output_tokens": generated},
        "x_tokenscaler_reason": message,
    }
    return (_event(delta) + _event({"type": "message_stop"})).encode()
