"""OpenAI-compatible request and response shapes: what the meter needs from them (pure).

Everything here takes bytes or decoded JSON and returns data; nothing raises on bad
input. A body that is not what the endpoint expects yields ``None`` (or zero counts),
and the proxy forwards it unchanged so the model server gives its own answer.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sidecar import jsonbody
from sidecar.jsonbody import Layout


class Kind(enum.Enum):
    CHAT = "chat"
    COMPLETIONS = "completions"
    EMBEDDINGS = "embeddings"
    RESPONSES = "responses"
    MESSAGES = "messages"  # Anthropic's Messages API: its shapes are in anthropic.py


# Streaming kinds whose usage must be asked for with ``stream_options.include_usage``;
# the Responses API always reports usage in its ``response.completed`` event.
USAGE_OPT_IN = frozenset({Kind.CHAT, Kind.COMPLETIONS})

_MAX_N = 128


@dataclass(frozen=True, slots=True)
class Usage:
    prompt: int  # every input token, cached ones included
    generation: int
    reasoning: int = 0  # hidden reasoning tokens among ``generation``, when the server says
    cache_read: int = 0  # input tokens among ``prompt`` read from the provider's prompt cache
    cache_write: int = 0  # input tokens among ``prompt`` written to it
    final: bool = True  # False: a stream's usage so far, whose generation may still grow


@dataclass(frozen=True, slots=True)
class ParsedRequest:
    kind: Kind
    model: str | None
    stream: bool
    max_tokens: int | None  # per choice, when the client set one
    n: int  # choices asked for
    wants_usage: bool  # the client itself asked for streamed usage
    prompt_texts: tuple[str, ...]  # text the prompt is made of, for estimates
    prompt_ids: int  # token ids given directly (completions / embeddings)
    messages: int  # chat messages or Responses input items
    layout: Layout | None = None  # where the body's top-level values lie (request_rules.check)


@dataclass(frozen=True, slots=True)
class Chunk:
    """What one streamed event says."""

    pieces: int = 0  # generated pieces: one per choice that carries new content
    texts: tuple[str, ...] = ()  # the generated text in it, for the tokenizer fallback
    usage: Usage | None = None
    usage_only: bool = False  # the extra chunk include_usage adds: no choices, only usage
    null_usage: bool = False  # has a top-level ``"usage": null`` (include_usage adds one)
    model: str | None = None  # the model the answer names, read with the usage only


DONE = Chunk()


def json_or_none(body: bytes | str) -> Any:
    """The JSON document, None when it is not JSON (or nests past the parser's depth)."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


def _positive_int(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


def _texts_and_ids(value: object) -> tuple[list[str], int]:
    """A ``prompt`` / ``input``: a string, a list of strings, token ids, or lists of ids."""
    if isinstance(value, str):
        return [value], 0
    texts: list[str] = []
    ids = 0
    if isinstance(value, list):
        for item in value:
            if isinstance(item, str):
                texts.append(item)
            elif isinstance(item, int):
                ids += 1
            elif isinstance(item, list):
                ids += sum(1 for i in item if isinstance(i, int))
    return texts, ids


def _content_texts(content: object) -> Iterable[str]:
    """A message's content: a string or a list of parts with text in ``text``."""
    if isinstance(content, str):
        yield content
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, dict):
                text = part.get("text")
                if isinstance(text, str):
                    yield text
            elif isinstance(part, str):
                yield part


def _messages(value: object) -> tuple[list[str], int]:
    if isinstance(value, str):
        return [value], 1
    if not isinstance(value, list):
        return [], 0
    texts: list[str] = []
    for message in value:
        if isinstance(message, dict):
            texts.extend(_content_texts(message.get("content")))
    return texts, len(value)


def parse_request(kind: Kind, body: bytes) -> ParsedRequest | None:
    doc = json_or_none(body)
    if not isinstance(doc, dict):
        return None
    return parse_document(kind, doc)


def parse_document(
    kind: Kind, doc: dict[str, Any], layout: Layout | None = None, limit: int | bool | None = False
) -> ParsedRequest:
    """What the meter needs from a decoded request (``request_rules`` checked its types);
    ``limit``: the generation limit it found, unless False."""
    model = doc.get("model")
    stream = doc.get("stream") is True and kind is not Kind.EMBEDDINGS
    options = doc.get("stream_options")
    wants_usage = isinstance(options, dict) and options.get("include_usage") is True
    n = min(_positive_int(doc.get("n")) or 1, _MAX_N) if kind in USAGE_OPT_IN else 1
    texts: list[str]
    ids = 0
    messages = 0
    max_tokens: int | None = None
    if kind is Kind.CHAT:
        texts, messages = _messages(doc.get("messages"))
        max_tokens = _positive_int(doc.get("max_completion_tokens")) or _positive_int(doc.get("max_tokens"))
    elif kind is Kind.COMPLETIONS:
        texts, ids = _texts_and_ids(doc.get("prompt"))
        max_tokens = _positive_int(doc.get("max_tokens"))
    elif kind is Kind.EMBEDDINGS:
        texts, ids = _texts_and_ids(doc.get("input"))
    else:
        texts, messages = _messages(doc.get("input"))
        instructions = doc.get("instructions")
        if isinstance(instructions, str):
            texts.append(instructions)
        max_tokens = _positive_int(doc.get("max_output_tokens"))
    if limit is not False and kind is not Kind.EMBEDDINGS:
        max_tokens = int(limit) if limit is not None else None
    return ParsedRequest(
        kind=kind,
        model=model if isinstance(model, str) and model else None,
        stream=stream,
        max_tokens=max_tokens,
        n=n,
        wants_usage=wants_usage,
        prompt_texts=tuple(texts),
        prompt_ids=ids,
        messages=messages,
        layout=layout,
    )


def _laid_out(body: bytes, layout: Layout | None) -> Layout | None:
    if layout is not None:
        return layout
    try:
        return jsonbody.decode(body.decode("utf-8"))[1]
    except (ValueError, RecursionError):
        return None


def with_usage_requested(body: bytes, layout: Layout | None = None) -> bytes | None:
    """The body with ``stream_options.include_usage`` set, or None when it cannot be done.

    Only ``stream_options`` changes (inserted first when absent): the rest of the body
    reaches the upstream byte for byte. ``layout``: the body's, when known (no parse then).
    """
    layout = _laid_out(body, layout)
    if layout is None:
        return None
    span = layout.spans.get("stream_options")
    options: object = None
    if span is not None:
        options = json.loads(body.decode("utf-8")[span[0] : span[1]])
    if options is not None and not isinstance(options, dict):
        return None  # the server will reject it; do not make it worse
    return jsonbody.edited(body, layout, {"stream_options": {**(options or {}), "include_usage": True}})


_NULL_USAGE = re.compile(rb',\s*"usage"\s*:\s*null|"usage"\s*:\s*null(?:\s*,\s*)?')


def strip_null_usage(raw: bytes) -> bytes:
    """Remove the top-level ``"usage": null`` that include_usage adds to every chunk.

    Inside JSON strings quotes are escaped, so a bare ``"usage"`` is always a key.
    """
    return _NULL_USAGE.sub(b"", raw, count=1)


def token_count(value: object) -> int | None:
    """A count of tokens as a server reports it: a non-negative int (no bool), else None."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def usage_of(kind: Kind, usage: object) -> Usage | None:
    """A ``usage`` object's prompt and generated tokens; None when it does not say them."""
    if not isinstance(usage, dict):
        return None
    if kind is Kind.RESPONSES:
        prompt = token_count(usage.get("input_tokens"))
        generation = token_count(usage.get("output_tokens"))
    else:
        prompt, generation = (
            token_count(usage.get("prompt_tokens")),
            token_count(usage.get("completion_tokens")),
        )
        if kind is Kind.EMBEDDINGS and generation is None:
            generation = 0
        total = token_count(usage.get("total_tokens"))
        if generation is None and prompt is not None and total is not None and total >= prompt:
            generation = total - prompt
    if prompt is None or generation is None:
        return None
    details = usage.get("output_tokens_details" if kind is Kind.RESPONSES else "completion_tokens_details")
    reasoning = token_count(details.get("reasoning_tokens")) if isinstance(details, dict) else None
    inputs = usage.get("input_tokens_details" if kind is Kind.RESPONSES else "prompt_tokens_details")
    cached = token_count(inputs.get("cached_tokens")) if isinstance(inputs, dict) else None
    return Usage(prompt, generation, reasoning or 0, min(cached or 0, prompt))


def _delta_texts(delta: object) -> list[str]:
    if not isinstance(delta, dict):
        return []
    texts = [
        value
        for key in ("content", "reasoning_content", "reasoning", "refusal")
        if isinstance(value := delta.get(key), str) and value
    ]
    calls = delta.get("tool_calls")
    if isinstance(calls, list):
        for call in calls:
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict):
                for key in ("name", "arguments"):
                    value = function.get(key)
                    if isinstance(value, str) and value:
                        texts.append(value)
    return texts


def _choice_texts(kind: Kind, choice: object) -> list[str]:
    if not isinstance(choice, dict):
        return []
    if kind is Kind.CHAT:
        # Streamed choices carry ``delta``, complete ones ``message``.
        return _delta_texts(choice.get("delta", choice.get("message")))
    text = choice.get("text")
    return [text] if isinstance(text, str) and text else []


_RESPONSES_DELTAS = frozenset(
    {
        "response.output_text.delta",
        "response.reasoning_text.delta",
        "response.reasoning_summary_text.delta",
        "response.refusal.delta",
        "response.function_call_arguments.delta",
    }
)
_RESPONSES_DONE = frozenset({"response.completed", "response.incomplete", "response.failed"})


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


def parse_chunk(kind: Kind, data: str) -> Chunk | None:
    """One SSE event's data; None when it is not the JSON the endpoint streams."""
    if data == "[DONE]":
        return DONE
    doc = json_or_none(data)
    if not isinstance(doc, dict):
        return None
    if kind is Kind.RESPONSES:
        kind_of = doc.get("type")
        if not isinstance(kind_of, str):
            return Chunk()
        if kind_of in _RESPONSES_DELTAS:
            delta = doc.get("delta")
            return Chunk(1, (delta,) if isinstance(delta, str) else ())
        if kind_of in _RESPONSES_DONE:
            response = doc.get("response")
            if not isinstance(response, dict):
                return Chunk()
            model = response.get("model")
            return Chunk(usage=usage_of(kind, response.get("usage")), model=_text(model))
        return Chunk()
    choices = doc.get("choices")
    if not isinstance(choices, list):
        if "error" in doc:
            return Chunk()
        return None
    pieces = 0
    texts: list[str] = []
    for choice in choices:
        found = _choice_texts(kind, choice)
        if found:
            pieces += 1
            texts.extend(found)
    raw_usage = doc.get("usage")
    usage = usage_of(kind, raw_usage)
    return Chunk(
        pieces=pieces,
        texts=tuple(texts),
        usage=usage,
        usage_only=usage is not None and not choices,
        null_usage="usage" in doc and raw_usage is None,
        model=_text(doc.get("model")) if usage is not None else None,
    )


@dataclass(frozen=True, slots=True)
class Complete:
    """What a non-streamed response says."""

    usage: Usage | None
    texts: tuple[str, ...]  # generated text, for the tokenizer fallback
    model: str | None


def parse_response(kind: Kind, body: bytes) -> Complete | None:
    doc = json_or_none(body)
    if not isinstance(doc, dict):
        return None
    texts: list[str] = []
    if kind is Kind.RESPONSES:
        output = doc.get("output")
        if isinstance(output, list):
            for item in output:
                if isinstance(item, dict):
                    texts.extend(_content_texts(item.get("content")))
    elif kind is not Kind.EMBEDDINGS:
        choices = doc.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                texts.extend(_choice_texts(kind, choice))
    model = doc.get("model")
    return Complete(usage_of(kind, doc.get("usage")), tuple(texts), model if isinstance(model, str) else None)


def error_body(message: str, type_: str, code: str, param: str | None = None) -> bytes:
    """An error in OpenAI's shape, so SDKs raise their usual exception with our message."""
    return json.dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": code}},
        separators=(",", ":"),
    ).encode()


# Every field some model server reads as the generation limit (``n_predict``: llama.cpp's);
# request_rules.py refuses a request whose fields disagree.
LIMIT_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens", "n_predict")


def limit_field(kind: Kind) -> str:
    """The field that carries the generation limit when the client set none."""
    return "max_output_tokens" if kind is Kind.RESPONSES else "max_tokens"


def rewritten(
    kind: Kind,
    body: bytes,
    *,
    max_tokens: int | None = None,
    model: str | None = None,
    layout: Layout | None = None,
) -> bytes:
    """The body with ``max_tokens`` and ``model`` replaced, every other byte as it was.

    The limit goes into every limit field the client used (``LIMIT_FIELDS``), or into the
    endpoint's own when it used none, so no server finds another value in a field it prefers.
    ``layout``: the body's, when known (no parse then).
    """
    layout = _laid_out(body, layout)
    if layout is None:
        return body
    values: dict[str, Any] = {}
    if max_tokens is not None:
        used = [key for key in LIMIT_FIELDS if key in layout.spans]
        values.update(dict.fromkeys(used or [limit_field(kind)], max_tokens))
    if model is not None:
        values["model"] = model
    return jsonbody.edited(body, layout, values)


def stop_event(kind: Kind, mode: str, message: str) -> bytes:
    """The last event of a stream the sidecar ends: an error (``mode="error"``) or a finish.

    An error event is what OpenAI sends when a stream fails (the SDKs raise it); a finish
    is a last chunk with ``finish_reason: "length"``, as if ``max_tokens`` had been reached.
    Either way the reason is in the event, and ``[DONE]`` follows for chat and completions.
    """
    if kind is Kind.RESPONSES:
        if mode == "error":
            doc: dict[str, Any] = {"type": "error", "code": "budget_exhausted", "message": message}
            name = "error"
        else:
            doc = {
                "type": "response.incomplete",
                "response": {"status": "incomplete", "incomplete_details": {"reason": "max_output_tokens"}},
                "x_tokenscaler_reason": message,
            }
            name = "response.incomplete"
        return f"event: {name}\ndata: {json.dumps(doc, separators=(',', ':'))}\n\n".encode()
    if mode == "error":
        doc = json.loads(error_body(message, "insufficient_quota", "budget_exhausted"))
    else:
        obj = "chat.completion.chunk" if kind is Kind.CHAT else "text_completion"
        choice: dict[str, Any] = {"index": 0, "finish_reason": "length"}
        if kind is Kind.CHAT:
            choice["delta"] = {}
        else:
            choice["text"] = ""
        doc = {"object": obj, "choices": [choice], "x_tokenscaler_reason": message}
    return f"data: {json.dumps(doc, separators=(',', ':'))}\n\ndata: [DONE]\n\n".encode()
