"""Connections to the replicas' sidecars, kept open between requests, and one answer relayed over one.

``Exchange`` is one request on one connection: it reads the answer's head, then passes the
answer's bytes to the client as they come, in the coding they came in (a chunked stream stays
chunked; an HTTP/1.0 client gets it decoded, the connection closing after), and knows from the
framing where the answer ends, so the connection can carry the next request. A non-streamed
answer of known length up to ``WHOLE_BODY_BYTES`` is sent in one write once complete: if the
replica breaks it off, the client gets a clean 502 instead of half an answer. Its ``future``
says how it ended (``Outcome``).

``UpstreamPool`` keeps the idle connections of each replica (the most recently used first)
and closes those idle for ``keepalive_s``: below the sidecar's own idle timeout
(``--header-timeout``, 30 s by default), so this side closes an idle connection first.
"""

from __future__ import annotations

import asyncio
import enum
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast
from urllib.parse import urlparse

from gateway.http1 import (
    CRLF,
    HEAD_END,
    MAX_RESPONSE_HEAD_BYTES,
    ChunkedReader,
    HttpError,
    ResponseHead,
    parse_response_head,
    without_chunked,
)

# Answers with a Content-Length up to this are read whole and sent in one write.
WHOLE_BODY_BYTES = 1 << 20
# A request body up to this goes out in one write with its head.
_JOIN_BODY_BYTES = 64 << 10
_CLOSE = b"Connection: close\r\n"


class Outcome(enum.Enum):
    DONE = "done"  # the whole answer went to the client
    UNANSWERED = "unanswered"  # the connection failed before any byte of an answer came
    TIMEOUT = "timeout"  # the replica said nothing within the read timeout
    BAD = "bad"  # a malformed or broken answer of which the client has seen nothing: it gets 502
    BROKEN = "broken"  # the answer broke off after part of it went out: so does the client's


_HEAD, _BODY, _DONE = range(3)


class Exchange:
    """One request sent to a replica, its answer relayed to ``write`` as it comes."""

    __slots__ = (
        "_buffer",
        "_decode",
        "_head_only",
        "_last_read",
        "_left",
        "_loop",
        "_pending",
        "_progress",
        "_reader",
        "_reusable",
        "_state",
        "_timeout",
        "_timer",
        "_until_close",
        "_whole",
        "_write",
        "close_client",
        "detail",
        "first_out",
        "future",
        "received",
        "status",
        "upstream",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        write: Callable[[bytes], None],
        *,
        progress: Callable[[int], None] | None,
        head_only: bool,
        whole: bool,
        decode: bool,
        keep_client: bool,
        read_timeout_s: float,
    ) -> None:
        """``progress``: told how many stream events (``data:``) each piece carries; ``whole``:
        an answer of known, small length is sent in one write; ``decode``: the client takes no
        chunked coding (HTTP/1.0); ``keep_client``: its connection stays open after."""
        self.future: asyncio.Future[Outcome] = loop.create_future()
        self.detail = ""
        self.status = 0
        self.received = False  # a byte of the answer came
        self.first_out: float | None = None  # monotonic time its first bytes went to the client
        self.close_client = not keep_client or decode
        self.upstream: Upstream | None = None
        self._loop = loop
        self._write = write
        self._progress = progress
        self._head_only = head_only
        self._whole = whole
        self._decode = decode
        self._timeout = read_timeout_s
        self._last_read = loop.time()
        self._timer = loop.call_later(read_timeout_s, self._check_silence)
        self._state = _HEAD
        self._buffer = b""
        self._left = 0
        self._reader: ChunkedReader | None = None
        self._until_close = False
        self._pending: list[bytes] | None = None
        self._reusable = False

    @property
    def sent(self) -> bool:
        return self.first_out is not None

    def _out(self, data: bytes) -> None:
        if self.first_out is None:
            self.first_out = time.monotonic()
        self._write(data)

    # -- from the connection ------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        self.received = True
        self._last_read = self._loop.time()
        if self._state == _HEAD:
            buffer = self._buffer + data if self._buffer else data
            while True:
                end = buffer.find(HEAD_END)
                if end < 0:
                    if len(buffer) > MAX_RESPONSE_HEAD_BYTES:
                        self._fail(
                            Outcome.BAD, f"the replica's answer head passed {MAX_RESPONSE_HEAD_BYTES} bytes"
                        )
                    else:
                        self._buffer = buffer
                    return
                try:
                    head = parse_response_head(buffer[:end])
                except HttpError as exc:
                    self._fail(Outcome.BAD, str(exc))
                    return
                buffer = buffer[end + 4 :]
                if head.status >= 200:
                    break
                # 1xx: an interim answer (the gateway asks for none); the real one follows.
            self._buffer = b""
            if not self._start(head, buffer) or not buffer:
                return
            data = buffer
        self._body(data)

    def _start(self, head: ResponseHead, rest: bytes) -> bool:
        """Frame the answer and send (or keep) its head; False when it is already complete
        (``rest``: the bytes that came after the head)."""
        self.status = head.status
        self._reusable = not head.close
        out = head.head
        if self._head_only or head.status in (204, 304):
            length: int | None = 0
        elif head.chunked:
            self._reader = ChunkedReader(keep=self._decode)
            length = None
            if self._decode:
                out = without_chunked(out)
        elif head.content_length is not None:
            length = self._left = head.content_length
        else:
            length = None
            self._until_close = True  # the answer ends when the replica closes the connection
            self._reusable = False
            self.close_client = True
        if self.close_client:
            out += _CLOSE
        out += CRLF
        self._state = _BODY
        if self._whole and length is not None and length <= WHOLE_BODY_BYTES:
            self._pending = [out]
        else:
            self._out(out)
        if length == 0:
            if rest:
                self._reusable = False  # bytes after a complete answer: the connection is not reused
            self._finish()
            return False
        return True

    def _body(self, data: bytes) -> None:
        done = False
        reader = self._reader
        if reader is not None:
            try:
                used = reader.feed(data)
            except HttpError as exc:
                self._fail(Outcome.BROKEN if self.sent else Outcome.BAD, f"{exc} (from the replica)")
                return
            if used < len(data):
                piece = data[:used]
                self._reusable = False
            else:
                piece = data
            done = reader.done
            out = reader.body() if self._decode else piece
        elif self._until_close:
            out = piece = data
        else:
            if len(data) > self._left:
                piece = data[: self._left]
                self._reusable = False
            else:
                piece = data
            self._left -= len(piece)
            done = not self._left
            out = piece
        if self._progress is not None:
            events = piece.count(b"data:")
            if events:
                self._progress(events)
        if self._pending is not None:
            self._pending.append(out)
        elif out:
            self._out(out)
        if done:
            self._finish()

    def lost(self, exc: Exception | None) -> None:
        """The connection closed (``exc``: why, None at the replica's end of stream)."""
        self.upstream = None
        if self._state == _DONE:
            return
        if self._state == _HEAD:
            if self.received:
                self._resolve(Outcome.BAD, "the replica closed the connection inside its answer's head")
            else:
                why = f": {exc}" if exc is not None else ""
                self._resolve(Outcome.UNANSWERED, f"the replica closed the connection before answering{why}")
        elif self._until_close and exc is None:
            self._finish()
        else:
            self._resolve(
                Outcome.BROKEN if self.sent else Outcome.BAD, "the replica closed the connection mid-answer"
            )

    # -- endings ------------------------------------------------------------------------------

    def _finish(self) -> None:
        if self._pending is not None:
            self._out(b"".join(self._pending))
            self._pending = None
        upstream = self.upstream
        self.upstream = None
        if upstream is not None:
            upstream.done(self._reusable)
        self._resolve(Outcome.DONE, "")

    def _resolve(self, outcome: Outcome, detail: str) -> None:
        self._state = _DONE
        self._timer.cancel()
        self.detail = detail
        if not self.future.done():
            self.future.set_result(outcome)

    def _fail(self, outcome: Outcome, detail: str) -> None:
        upstream = self.upstream
        self.upstream = None
        if upstream is not None:
            upstream.exchange = None
            upstream.abort()
        self._resolve(outcome, detail)

    def _check_silence(self) -> None:
        if self._state == _DONE:
            return
        now = self._loop.time()
        upstream = self.upstream
        if upstream is not None and upstream.paused:
            # Not reading because the client is slow to take what came: that is no silence.
            self._last_read = now
        silent = now - self._last_read
        if silent < self._timeout:
            self._timer = self._loop.call_later(self._timeout - silent, self._check_silence)
            return
        if self._state == _HEAD and not self.received:
            outcome = Outcome.TIMEOUT
        else:
            outcome = Outcome.BROKEN if self.sent else Outcome.BAD
        self._fail(outcome, f"the replica sent nothing for {self._timeout:g}s")

    def abandon(self) -> None:
        """The client went away: the connection is closed (the replica sees its client go)."""
        if self._state != _DONE:
            self._fail(Outcome.BROKEN, "the client went away")


class Upstream(asyncio.Protocol):
    """One connection to a replica; it carries one exchange at a time."""

    def __init__(self, pool: UpstreamPool, url: str) -> None:
        self.pool = pool
        self.url = url
        self.transport: asyncio.Transport | None = None
        self.exchange: Exchange | None = None
        self.closed = False
        self.paused = False
        self.idle_since = 0.0
        self.sent = 0  # requests sent on it

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not its subclasses

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:
            self.abort()  # bytes nobody asked for: the connection cannot be trusted
        else:
            exchange.feed(data)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.forget(self)
        exchange = self.exchange
        if exchange is not None:
            self.exchange = None
            exchange.lost(exc)

    def send(self, exchange: Exchange, head: bytes, body: bytes) -> None:
        assert self.transport is not None
        self.exchange = exchange
        exchange.upstream = self
        self.sent += 1
        if len(body) <= _JOIN_BODY_BYTES:
            self.transport.write(head + body)
        else:
            self.transport.writelines((head, body))

    def done(self, reusable: bool) -> None:
        """Its exchange ended: back to the pool, or closed."""
        self.exchange = None
        if self.paused:
            self.resume()
        if reusable and not self.closed:
            self.pool.put(self)
        else:
            self.close()

    def pause(self) -> None:
        if not self.paused and self.transport is not None and not self.closed:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused and self.transport is not None and not self.closed:
            self.paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int
    tls: ssl.SSLContext | None
    host_header: bytes  # what the Host header says: the URL's host[:port]
    prefix: bytes  # the URL's path, put before each request's target


def address_of(url: str) -> Address:
    parsed = urlparse(url)
    https = parsed.scheme == "https"
    host = parsed.hostname
    if host is None:
        raise ValueError(f"replica URL without a host: {url!r}")
    return Address(
        host,
        parsed.port or (443 if https else 80),
        ssl.create_default_context() if https else None,
        parsed.netloc.rpartition("@")[2].encode("idna"),
        parsed.path.rstrip("/").encode("latin-1"),
    )


class UpstreamPool:
    def __init__(self, connect_timeout_s: float, keepalive_s: float) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.keepalive_s = keepalive_s
        self._idle: dict[str, list[Upstream]] = {}
        self._open: set[Upstream] = set()
        self._addresses: dict[str, Address] = {}
        self._sweeper: asyncio.TimerHandle | None = None

    def address(self, url: str) -> Address:
        address = self._addresses.get(url)
        if address is None:
            address = self._addresses[url] = address_of(url)
        return address

    def idle(self, url: str) -> Upstream | None:
        """An open, idle connection to the replica, if one is kept."""
        kept = self._idle.get(url)
        if not kept:
            return None
        now = time.monotonic()
        while kept:
            conn = kept.pop()
            if not conn.closed and now - conn.idle_since < self.keepalive_s:
                return conn
            conn.close()
        return None

    async def connect(self, url: str) -> Upstream:
        """A new connection; OSError or TimeoutError when the replica cannot be reached."""
        address = self.address(url)
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.connect_timeout_s):
            _transport, conn = await loop.create_connection(
                lambda: Upstream(self, url),
                address.host,
                address.port,
                ssl=address.tls,
                server_hostname=address.host if address.tls is not None else None,
            )
        self._open.add(conn)
        if self._sweeper is None:
            self._sweeper = loop.call_later(self.keepalive_s / 3, self._sweep)
        return conn

    def put(self, conn: Upstream) -> None:
        conn.idle_since = time.monotonic()
        kept = self._idle.get(conn.url)
        if kept is None:
            kept = self._idle[conn.url] = []
        kept.append(conn)

    def forget(self, conn: Upstream) -> None:
        """A connection closed."""
        self._open.discard(conn)
        kept = self._idle.get(conn.url)
        if kept is not None and conn in kept:
            kept.remove(conn)
            if not kept:
                del self._idle[conn.url]

    def _sweep(self) -> None:
        """Close the connections idle for ``keepalive_s``."""
        now = time.monotonic()
        for kept in list(self._idle.values()):
            for conn in [c for c in kept if now - c.idle_since >= self.keepalive_s]:
                conn.close()
        self._sweeper = asyncio.get_running_loop().call_later(self.keepalive_s / 3, self._sweep)

    @property
    def open(self) -> int:
        return len(self._open)

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in list(self._open):
            conn.abort()
