"""A request body's top-level JSON object: decoded strictly, where each value lies, edited in place.

``decode`` reads the top level itself and each value with the C scanner, so it knows where
every top-level value lies in the text (``Layout``): a rewrite of ``max_tokens`` or ``model``,
or the ``stream_options`` the sidecar adds, then replaces those spans and leaves every other
byte as the client sent it, without parsing and serialising the whole body again. Objects at
any depth go through a Python hook that refuses duplicate keys (parsers disagree on which one
wins); the hook also lets a parse in a worker thread hand the interpreter back to the event
loop between objects. ``NaN`` and ``Infinity`` are refused: they are not JSON.
"""

from __future__ import annotations

import json
import json.decoder
import json.scanner
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class Duplicate(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc = dict(pairs)
    if len(doc) != len(pairs):
        seen: set[str] = set()
        for key, _value in pairs:
            if key in seen:
                raise Duplicate(key)
            seen.add(key)
    return doc


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


# The standard library's scanner (C) and string reader; typeshed types make_scanner as a class.
_SCAN: Callable[[str, int], tuple[Any, int]] = json.scanner.make_scanner(
    json.JSONDecoder(object_pairs_hook=_object, parse_constant=_not_json)  # type: ignore[arg-type]
)
_STRING: Callable[[str, int], tuple[str, int]] = json.decoder.scanstring  # type: ignore[attr-defined]
_WS = re.compile(r"[ \t\n\r]*")
_COLON = re.compile(r"[ \t\n\r]*:[ \t\n\r]*")
_NEXT = re.compile(r"[ \t\n\r]*([,}])[ \t\n\r]*")


@dataclass(frozen=True, slots=True)
class Layout:
    """Where the top-level values lie in the body's text."""

    opening: int  # just after the opening brace
    spans: dict[str, tuple[int, int]]


class NotAnObject(ValueError):
    pass


def _skip(text: str, at: int) -> int:
    match = _WS.match(text, at)
    assert match is not None  # the pattern matches the empty string
    return match.end()


def decode(text: str) -> tuple[dict[str, Any], Layout]:
    """The top-level object and its layout; raises ``Duplicate``, ``NotAnObject``,
    ``ValueError`` (not JSON) or ``RecursionError`` (nested too deep)."""
    at = _skip(text, 0)
    if not text.startswith("{", at):
        json.loads(text, parse_constant=_not_json)  # says why when it is not JSON at all
        raise NotAnObject("the request body must be a JSON object")
    opening = at + 1
    doc: dict[str, Any] = {}
    spans: dict[str, tuple[int, int]] = {}
    at = _skip(text, opening)
    closed = text.startswith("}", at)
    if closed:
        at = _skip(text, at + 1)
    while not closed:
        if not text.startswith('"', at):
            raise ValueError(f"expected a key in double quotes at character {at}")
        key, at = _STRING(text, at + 1)
        colon = _COLON.match(text, at)
        if colon is None:
            raise ValueError(f"expected ':' at character {at}")
        at = colon.end()
        try:
            value, end = _SCAN(text, at)
        except StopIteration:
            raise ValueError(f"expected a value at character {at}") from None
        if key in doc:
            raise Duplicate(key)
        doc[key], spans[key] = value, (at, end)
        after = _NEXT.match(text, end)
        if after is None:
            raise ValueError(f"expected ',' or '}}' at character {end}")
        at, closed = after.end(), after.group(1) == "}"
    if at != len(text):
        raise ValueError(f"extra data after the object at character {at}")
    return doc, Layout(opening, spans)


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def edited(body: bytes, layout: Layout, values: dict[str, Any]) -> bytes:
    """The body with these top-level values set: a present key's value replaced where it lies,
    a new key inserted first; every other byte as it was."""
    text = body.decode("utf-8")
    inserts = [f'"{key}":{_dumps(value)},' for key, value in values.items() if key not in layout.spans]
    replaced = sorted(
        (layout.spans[key], _dumps(value)) for key, value in values.items() if key in layout.spans
    )
    parts: list[str] = []
    at = 0
    if inserts:
        new = "".join(inserts)
        if not layout.spans:
            new = new[:-1]  # an empty object: no comma after the last
        parts += [text[: layout.opening], new]
        at = layout.opening
    for (start, end), value in replaced:
        parts += [text[at:start], value]
        at = end
    parts.append(text[at:])
    return "".join(parts).encode("utf-8")
