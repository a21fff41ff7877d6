"""HTTP/1.1 as the gateway's data path reads it: request and response heads, chunked bodies (pure).

Only what relaying needs is parsed: the request line, the headers that frame a message
(``Content-Length``, ``Transfer-Encoding``), those that name the connection's fate
(``Connection``, ``Expect``) and the hop-by-hop ones a proxy must not pass on (RFC 9110
7.6.1). Everything else is carried as the bytes that came. What would let two parsers read
one message differently is refused: both a length and ``Transfer-Encoding``, lengths that
disagree, a coding other than ``chunked``, folded header lines, bare line feeds, control
characters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sidecar import responses as sidecar_responses

# A request head (request line and headers) longer than this gets 431.
MAX_HEAD_BYTES = 32 << 10
# A response head longer than this is a bad answer from the replica.
MAX_RESPONSE_HEAD_BYTES = 64 << 10
# A chunk-size line (with its extensions) longer than this is malformed.
MAX_CHUNK_LINE_BYTES = 1024
# Trailer fields after the last chunk, in bytes.
MAX_TRAILER_BYTES = 16 << 10

CRLF = b"\r\n"
HEAD_END = b"\r\n\r\n"

# RFC 9110 7.6.1: meaningful for one connection only, never forwarded (the sidecar's list).
HOP_BY_HOP = frozenset(name.encode() for name in sidecar_responses.HOP_BY_HOP)
# What the gateway sets itself on the request it sends a replica.
_REQUEST_OWN = frozenset({b"host", b"content-length", b"expect"})

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_TARGET = re.compile(rb"[\x21-\x7e\x80-\xff]+\Z")
_DIGITS = re.compile(rb"[0-9]{1,18}\Z")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,15}\Z")
_STATUS = re.compile(rb"HTTP/1\.[01] ([1-9][0-9][0-9])(?: [^\r\n]*)?\Z")


class HttpError(Exception):
    """A message the gateway will not relay; ``status`` is the answer it gets (the message says why)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


def _bad(message: str) -> HttpError:
    return HttpError(400, "bad_request", message)


@dataclass(slots=True)
class RequestHead:
    method: str
    target: str  # as sent: path and query, not normalised
    minor: int  # HTTP/1.<minor>
    keep_alive: bool
    content_length: int | None
    chunked: bool
    expect_continue: bool
    forward: bytes  # the header lines a replica gets (end-to-end only, no Host, no length), CRLF each


@dataclass(slots=True)
class ResponseHead:
    status: int
    head: bytes  # status line and end-to-end headers, CRLF each (the framing headers kept as they are)
    content_length: int | None
    chunked: bool
    close: bool  # the replica closes the connection after this response


def _fields(lines: list[bytes], what: str) -> list[tuple[bytes, bytes, bytes]]:
    """(lower-case name, value, the line) of each header line; HttpError for a malformed one."""
    out = []
    for line in lines:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.match(name):
            if line[:1] in (b" ", b"\t"):
                raise _bad(f"folded header line in the {what} head: {line[:60]!r}")
            raise _bad(f"malformed header line in the {what} head: {line[:60]!r}")
        value = value.strip(b" \t")
        if _BAD_VALUE.search(value):
            raise _bad(f"control character in header {name.decode('latin-1')!r} of the {what} head")
        out.append((name.lower(), value, line))
    return out


_FRAMING = (b"content-length", b"transfer-encoding", b"connection", b"expect")


def _framing(fields: list[tuple[bytes, bytes, bytes]]) -> list[list[bytes]]:
    """The values of Content-Length, Transfer-Encoding, Connection and Expect, in that order."""
    found: dict[bytes, list[bytes]] = {name: [] for name in _FRAMING}
    for name, value, _line in fields:
        values = found.get(name)
        if values is not None:
            values.append(value)
    return list(found.values())


def _length(values: list[bytes], what: str) -> int | None:
    if not values:
        return None
    parts = [p.strip(b" \t") for v in values for p in v.split(b",")]
    if not all(_DIGITS.match(p) for p in parts) or len({int(p) for p in parts}) != 1:
        shown = b", ".join(values).decode("latin-1")
        raise _bad(f"Content-Length {shown!r} of the {what} is not one decimal length")
    return int(parts[0])


def _coding(values: list[bytes], what: str) -> bool:
    """True for ``chunked``; HttpError for any other transfer coding."""
    if not values:
        return False
    codings = [c.strip(b" \t").lower() for v in values for c in v.split(b",") if c.strip(b" \t")]
    if codings != [b"chunked"]:
        shown = b", ".join(values).decode("latin-1")
        raise HttpError(
            501, "not_implemented", f"Transfer-Encoding {shown!r} of the {what}: only chunked is taken"
        )
    return True


def _connection_tokens(values: list[bytes]) -> set[bytes]:
    return {t.strip(b" \t").lower() for v in values for t in v.split(b",") if t.strip(b" \t")}


def parse_request_head(head: bytes) -> RequestHead:
    """The head of a client's request, without its final blank line."""
    if len(head) > MAX_HEAD_BYTES:
        raise HttpError(
            431, "head_too_large", f"request head larger than the gateway's limit of {MAX_HEAD_BYTES} bytes"
        )
    lines = head.split(CRLF)
    request_line = lines[0]
    parts = request_line.split(b" ")
    if len(parts) != 3 or not _TOKEN.match(parts[0]) or not _TARGET.match(parts[1]):
        raise _bad(f"malformed request line: {request_line[:80]!r}")
    method, target, version = parts
    if version == b"HTTP/1.1":
        minor = 1
    elif version == b"HTTP/1.0":
        minor = 0
    elif version.startswith(b"HTTP/"):
        raise HttpError(505, "version_not_supported", f"{version.decode('latin-1')!r}: HTTP/1.1 or 1.0 only")
    else:
        raise _bad(f"malformed request line: {request_line[:80]!r}")
    fields = _fields(lines[1:], "request")
    lengths, codings, connection, expects = _framing(fields)
    expect = expects[-1].lower() if expects else None
    if lengths and codings:
        raise _bad("the request has both Content-Length and Transfer-Encoding")
    if codings and minor == 0:
        raise _bad("Transfer-Encoding in an HTTP/1.0 request")
    content_length = _length(lengths, "request")
    chunked = _coding(codings, "request")
    if expect is not None and expect != b"100-continue":
        raise HttpError(
            417, "expectation_failed", f"Expect {expect.decode('latin-1')!r}: only 100-continue is met"
        )
    tokens = _connection_tokens(connection)
    keep_alive = b"close" not in tokens if minor else b"keep-alive" in tokens
    drop = HOP_BY_HOP | _REQUEST_OWN | tokens
    forward = b"".join(line + CRLF for name, _v, line in fields if name not in drop)
    return RequestHead(
        method.decode("ascii"),
        target.decode("latin-1"),
        minor,
        keep_alive,
        content_length,
        chunked,
        expect == b"100-continue" and minor == 1,
        forward,
    )


def parse_response_head(head: bytes) -> ResponseHead:
    """The head of a replica's answer, without its final blank line; HttpError (502) when malformed."""
    lines = head.split(CRLF)
    match = _STATUS.match(lines[0])
    if match is None:
        raise HttpError(502, "replica_error", f"malformed status line from the replica: {lines[0][:80]!r}")
    try:
        fields = _fields(lines[1:], "response")
    except HttpError as exc:
        raise HttpError(502, "replica_error", f"{exc} (from the replica)") from None
    lengths, codings, connection, _expects = _framing(fields)
    try:
        chunked = _coding(codings, "response")
        content_length = None if chunked else _length(lengths, "response")
    except HttpError as exc:
        raise HttpError(502, "replica_error", f"{exc} (from the replica)") from None
    tokens = _connection_tokens(connection)
    # The framing passes as it came (the body is relayed in its own coding); the rest of what
    # belongs to the replica's connection stays there.
    drop = (HOP_BY_HOP - {b"transfer-encoding"}) | tokens
    if chunked:
        drop = drop | {b"content-length"}
    kept = [lines[0]] + [line for name, _v, line in fields if name not in drop]
    close = b"close" in tokens or (lines[0].startswith(b"HTTP/1.0") and b"keep-alive" not in tokens)
    return ResponseHead(int(match.group(1)), CRLF.join(kept) + CRLF, content_length, chunked, close)


def without_chunked(head: bytes) -> bytes:
    """A response head without its ``Transfer-Encoding`` line (its body is sent decoded)."""
    lines = head.split(CRLF)
    return CRLF.join(
        line for line in lines if line.partition(b":")[0].strip().lower() != b"transfer-encoding"
    )


_SIZE, _DATA, _DATA_END, _TRAILER = range(4)


class ChunkedReader:
    """Where a chunked body ends, fed as its bytes come; its payload too with ``keep``.

    ``feed`` returns how many of the bytes belong to the body (the rest is what follows it);
    ``done`` turns true after the last chunk and the trailer. HttpError (400) when the coding
    is broken, (413) when the payload passes ``limit`` (0: no limit).
    """

    __slots__ = ("_left", "_line", "_state", "_trailer", "done", "keep", "limit", "parts", "size")

    def __init__(self, *, keep: bool, limit: int = 0) -> None:
        self.keep = keep
        self.limit = limit
        self.parts: list[bytes | bytearray] = []
        self.size = 0
        self.done = False
        self._state = _SIZE
        self._left = 0
        self._line = b""
        self._trailer = 0

    def feed(self, data: bytes | bytearray) -> int:
        i = 0
        n = len(data)
        while i < n and not self.done:
            if self._state == _DATA:
                take = min(self._left, n - i)
                if self.keep:
                    self.parts.append(data[i : i + take])
                self._left -= take
                i += take
                if not self._left:
                    self._state = _DATA_END
                continue
            j = data.find(b"\n", i)
            if j < 0:
                self._line += data[i:]
                self._check_line(len(self._line))
                return n
            line = self._line + data[i : j + 1] if self._line else data[i : j + 1]
            self._line = b""
            i = j + 1
            self._check_line(len(line))
            if not line.endswith(CRLF):
                raise _bad("bare line feed in a chunked body")
            self._line_done(line[:-2])
        return i

    def _check_line(self, size: int) -> None:
        if self._state == _TRAILER:
            if self._trailer + size > MAX_TRAILER_BYTES:
                raise _bad(f"chunked body's trailer longer than {MAX_TRAILER_BYTES} bytes")
        elif size > MAX_CHUNK_LINE_BYTES:
            raise _bad(f"chunk-size line longer than {MAX_CHUNK_LINE_BYTES} bytes")

    def _line_done(self, line: bytes | bytearray) -> None:
        if self._state == _DATA_END:
            if line:
                raise _bad("a chunk is longer than its size says")
            self._state = _SIZE
        elif self._state == _SIZE:
            size_text = line.split(b";", 1)[0].strip(b" \t")
            if not _HEX.match(size_text):
                raise _bad(f"malformed chunk size {line[:40]!r}")
            size = int(size_text, 16)
            if not size:
                self._state = _TRAILER
                return
            self.size += size
            if self.limit and self.size > self.limit:
                raise HttpError(
                    413, "too_large", f"request body larger than the gateway's limit of {self.limit} bytes"
                )
            self._left = size
            self._state = _DATA
        elif not line:
            self.done = True
        else:
            self._trailer += len(line) + 2

    def body(self) -> bytes:
        out = b"".join(self.parts)
        self.parts.clear()
        return out
