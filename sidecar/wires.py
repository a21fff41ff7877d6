"""The wire formats the sidecar counts, and which one a request speaks (by its endpoint's ``Kind``).

Each format reads its requests, answers and stream events into the same shapes (openai.py's
``ParsedRequest``, ``Complete``, ``Chunk``, ``Usage``), and writes the answers the sidecar
gives itself (errors, the last events of a stream it ends) in its own shape. The rest of
the request path asks ``of(kind)`` and never branches on the format itself.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sidecar import anthropic, openai
from sidecar.jsonbody import Layout
from sidecar.openai import Chunk, Complete, Kind, ParsedRequest, Usage


@dataclass(frozen=True, slots=True)
class Wire:
    name: str
    # a decoded request as metered: (kind, doc, layout, the generation limit found)
    parse_document: Callable[[Kind, dict[str, Any], Layout | None, int | bool | None], ParsedRequest]
    # one stream event's data, and the usage the stream said before it
    parse_chunk: Callable[[Kind, str, Usage | None], Chunk | None]
    parse_response: Callable[[Kind, bytes], Complete | None]
    # (status, message, OpenAI's error type, OpenAI's code, the parameter at fault)
    error_body: Callable[[int, str, str, str, str | None], bytes]
    # (kind, mode, message, pieces generated): the end of a stream past its reservation
    stop_event: Callable[[Kind, str, str, int], bytes]
    requires_limit: bool  # a request without a generation limit is refused


OPENAI = Wire(
    "openai",
    openai.parse_document,
    lambda kind, data, _previous: openai.parse_chunk(kind, data),
    openai.parse_response,
    lambda _status, message, type_, code, param: openai.error_body(message, type_, code, param),
    lambda kind, mode, message, _generated: openai.stop_event(kind, mode, message),
    requires_limit=False,
)

ANTHROPIC = Wire(
    "anthropic",
    anthropic.parse_document,
    anthropic.parse_chunk,
    anthropic.parse_response,
    lambda status, message, _type, _code, _param: anthropic.error_body(status, message),
    lambda _kind, mode, message, generated: anthropic.stop_event(mode, message, generated),
    requires_limit=True,  # Anthropic's API requires max_tokens
)


def of(kind: Kind | None) -> Wire:
    """The wire format of an endpoint (OpenAI's for anything not counted)."""
    return ANTHROPIC if kind is Kind.MESSAGES else OPENAI


def parse_request(kind: Kind, body: bytes) -> ParsedRequest | None:
    """A request body as metered (no checks: request_rules.py checks); None when it is not
    a JSON object."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return of(kind).parse_document(kind, doc, None, False) if isinstance(doc, dict) else None
