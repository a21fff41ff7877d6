"""Which endpoint a request path names, decided on the normalised path that is then forwarded (pure).

An HTTP client or server may resolve ``/v1/./chat/completions``, ``/v1/x/../chat/completions``
or ``//v1/chat/completions`` to ``/v1/chat/completions``; if the sidecar routed on the raw
path and the upstream resolved it, a completion would pass uncounted. So the path is
normalised first (percent-decoded segment by segment, empty segments dropped, dot segments
resolved as RFC 3986 says), routed on, and forwarded in that form, re-encoded: what the
model server sees is what was matched.

Refused with 400, never forwarded:
- a path whose encoded separators (``%2F``, ``%5C``, ``\\``) would name an endpoint the
  sidecar counts or refuses once a server decodes them (uvicorn decodes ``%2F``);
- a request target that is not an absolute path (``http://host/...`` or ``*``);
- POSTs to generation endpoints of model servers whose requests the sidecar cannot count
  (``UNCOUNTED``): their tokens would reach no budget, limit or record.

The endpoints are counted under ``/v1`` and without it (llama.cpp's server serves both).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote_from_bytes, unquote_to_bytes

from sidecar.openai import Kind

ENDPOINTS: dict[str, Kind] = {
    f"{prefix}{path}": kind
    for prefix in ("/v1", "")
    for path, kind in (
        ("/chat/completions", Kind.CHAT),
        ("/completions", Kind.COMPLETIONS),
        ("/embeddings", Kind.EMBEDDINGS),
        ("/responses", Kind.RESPONSES),
        ("/messages", Kind.MESSAGES),  # Anthropic's Messages API (its count_tokens passes through)
    )
}

# Generation endpoints of vLLM, llama.cpp, TGI and Ollama that are not OpenAI's: refused.
UNCOUNTED = frozenset(
    {
        "/completion",  # llama.cpp
        "/infill",  # llama.cpp
        "/invocations",  # SageMaker's (vLLM): a completion by its body
        "/generate",  # TGI, vLLM's legacy server
        "/generate_stream",  # TGI
        "/api/generate",  # Ollama
        "/api/chat",  # Ollama
    }
)

_PCHAR = b"!$&'()*+,;=:@-._~"  # unreserved and sub-delims: kept as they are in a segment
# What normalisation could change: an escape, an empty or dot segment, a backslash, a trailing /.
_UNUSUAL = re.compile(r"%|//|/\.|\\|./$")


@dataclass(frozen=True, slots=True)
class Target:
    path: str  # the normalised path, as routed on (decoded)
    forward: str  # what is sent upstream: the normalised path re-encoded, and the raw query
    kind: Kind | None  # a counted endpoint (POST only)
    refusal: str | None = None  # why it is refused


def _segments(raw: bytes) -> list[bytes]:
    out: list[bytes] = []
    for part in raw.split(b"/"):
        segment = unquote_to_bytes(part)
        if segment in (b"", b"."):
            continue
        if segment == b"..":
            if out:
                out.pop()
            continue
        out.append(segment)
    return out


def _key(segments: list[bytes]) -> str:
    return "/" + "/".join(s.decode("utf-8", "replace") for s in segments)


def route(method: str, raw_target: str) -> Target:
    raw_path, mark, query = raw_target.partition("?")
    if raw_path.startswith("/") and not _UNUSUAL.search(raw_path):  # already normal: most requests
        kind = ENDPOINTS.get(raw_path) if method == "POST" else None
        if not (method == "POST" and raw_path in UNCOUNTED):
            return Target(raw_path, raw_target, kind)
    if not raw_path.startswith("/"):
        return Target(raw_path, raw_target, None, "the request target must be a path starting with '/'")
    raw = raw_path.encode("utf-8", "surrogateescape")
    segments = _segments(raw)
    path = _key(segments)
    trailing = "/" if raw.endswith(b"/") and segments else ""
    forward = "/" + "/".join(quote_from_bytes(s, safe=_PCHAR) for s in segments)
    post = method == "POST"
    kind = ENDPOINTS.get(path) if post else None
    if kind is None:
        forward += trailing
    forward += mark + query
    if post and any(b"/" in s or b"\\" in s for s in segments):
        loose = _key(_segments(b"/".join(segments).replace(b"\\", b"/")))
        if loose in ENDPOINTS or loose in UNCOUNTED:
            return Target(path, forward, None, f"encoded separators in the path would make it {loose}")
    if post and path in UNCOUNTED:
        return Target(
            path,
            forward,
            None,
            f"{path} is not served through this proxy: its tokens could not be counted; "
            "use /v1/chat/completions, /v1/completions, /v1/responses, /v1/embeddings or /v1/messages",
        )
    return Target(path, forward, kind)
