"""What a counted request may say: strict JSON and strict types for the fields its cost depends on (pure).

The sidecar meters a request by what it reads in the body (``n``, the generation limit,
``stream``); the model server generates by what it reads. The two must be the same values,
so a request whose body two parsers could read differently is refused with an OpenAI-shaped
400 that names the field, before anything is reserved or forwarded:

- the body is one JSON object in UTF-8, without duplicate keys anywhere (parsers disagree
  on which one wins), without ``NaN``/``Infinity`` (not JSON), not nested so deep that
  parsing it would exhaust the interpreter's recursion limit (jsonbody.py);
- ``n`` (and ``best_of``) an integer from 1 to 128, ``best_of`` equal to ``n`` (the sidecar
  meters the choices returned); the generation limits (``max_tokens``,
  ``max_completion_tokens``, ``max_output_tokens``, llama.cpp's ``n_predict``) integers from
  1 to 2^31 - 1, and all those present equal; ``stream`` and
  ``stream_options.include_usage`` booleans; ``model`` a string. ``null`` is absence.

A lax server (pydantic turns ``"500"``, ``500.0`` and ``"true"`` into 500 and true) would
otherwise generate what the sidecar never counted. Whole floats and numeric strings are
refused rather than rewritten: the client's SDK sends integers, and a body is forwarded as
the client sent it unless a policy rewrites it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sidecar import jsonbody, openai, wires
from sidecar.jsonbody import Layout
from sidecar.openai import Kind, ParsedRequest

MAX_N = 128  # OpenAI's documented range of n
MAX_LIMIT = 2**31 - 1  # a C int: what llama.cpp's server reads into


@dataclass(frozen=True, slots=True)
class Refusal:
    param: str | None
    message: str
    code: str = "invalid_value"

    def body(self) -> bytes:
        return openai.error_body(self.message, "invalid_request_error", self.code, self.param)


def decode(body: bytes) -> tuple[dict[str, Any], Layout] | Refusal:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Refusal(None, f"the request body is not UTF-8 (byte {exc.start})", "invalid_json")
    try:
        return jsonbody.decode(text)
    except jsonbody.Duplicate as exc:
        return Refusal(exc.key, f"the key {exc.key!r} appears more than once in an object", "invalid_json")
    except RecursionError:
        return Refusal(None, "the request body is nested too deep", "invalid_json")
    except jsonbody.NotAnObject as exc:
        return Refusal(None, str(exc), "invalid_json")
    except ValueError as exc:
        return Refusal(None, f"the request body is not valid JSON: {exc}", "invalid_json")


def _int(doc: dict[str, Any], key: str, low: int, high: int, where: str = "") -> int | Refusal | None:
    value = doc.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        return Refusal(
            where + key, f"{where}{key}: expected an integer from {low} to {high}, got {json.dumps(value)}"
        )
    return value


def _bool(doc: dict[str, Any], key: str, where: str = "") -> Refusal | None:
    value = doc.get(key)
    if value is None or isinstance(value, bool):
        return None
    return Refusal(where + key, f"{where}{key}: expected true or false, got {json.dumps(value)}")


def _limit(doc: dict[str, Any]) -> int | Refusal | None:
    """The one generation limit every limit field present agrees on."""
    found: dict[str, int] = {}
    for key in openai.LIMIT_FIELDS:
        value = _int(doc, key, 1, MAX_LIMIT)
        if isinstance(value, Refusal):
            return value
        if value is not None:
            found[key] = value
    if len(set(found.values())) > 1:
        said = ", ".join(f"{key}={value}" for key, value in found.items())
        return Refusal(
            next(iter(found)),
            f"conflicting generation limits ({said}): send one of them, or the same value in each",
        )
    return next(iter(found.values()), None)


def _fields(kind: Kind, doc: dict[str, Any]) -> tuple[int | None, Refusal | None]:
    model = doc.get("model")
    if model is not None and not isinstance(model, str):
        return None, Refusal("model", f"model: expected a string, got {json.dumps(model)}")
    if kind is Kind.EMBEDDINGS:
        return None, None  # nothing generated: the prompt is what is counted
    for refusal in (_bool(doc, "stream"),):
        if refusal is not None:
            return None, refusal
    options = doc.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            return None, Refusal("stream_options", "stream_options: expected an object")
        refusal = _bool(options, "include_usage", "stream_options.")
        if refusal is not None:
            return None, refusal
    n = _int(doc, "n", 1, MAX_N)
    best_of = _int(doc, "best_of", 1, MAX_N)
    for value in (n, best_of):
        if isinstance(value, Refusal):
            return None, value
    if best_of is not None and best_of != (n or 1):
        return None, Refusal("best_of", f"best_of ({best_of}) must equal n ({n or 1}) through this proxy")
    limit = _limit(doc)
    if isinstance(limit, Refusal):
        return None, limit
    return limit, None


def check(kind: Kind, body: bytes) -> ParsedRequest | Refusal:
    """The request as metered, or why it is refused."""
    decoded = decode(body)
    if isinstance(decoded, Refusal):
        return decoded
    doc, layout = decoded
    limit, refusal = _fields(kind, doc)
    if refusal is not None:
        return refusal
    wire = wires.of(kind)
    if limit is None and wire.requires_limit:
        return Refusal("max_tokens", "max_tokens: required, an integer from 1 to " + str(MAX_LIMIT))
    return wire.parse_document(kind, doc, layout, limit)
