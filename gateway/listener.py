"""The gateway's data port: client connections read as HTTP/1.1, one request at a time each.

A connection reads the request head (``http1.py``), then its body: of a declared length, or
chunked (decoded), either at most ``max_body_bytes`` (413 past it). The whole request goes to
the handler, a task of its own; bytes that come meanwhile (a pipelined request) wait for it
to end, and reading pauses while they pass ``PIPELINE_BYTES``. Answers leave in the order the
requests came. A malformed head gets its 4xx and the connection closes (what follows it
cannot be framed). A client that closes its connection cancels its request's task: a held
request leaves the queue, a forwarded one's connection to the replica is closed.

A connection with no request in progress for ``idle_timeout_s`` is closed.
``drain`` stops accepting, closes idle connections, lets requests in flight finish for up to
its timeout (their connections close after the answer), then cancels what is left.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from email.utils import formatdate
from typing import cast

from gateway.http1 import HEAD_END, MAX_HEAD_BYTES, ChunkedReader, HttpError, RequestHead, parse_request_head
from gateway.upstream import Upstream

log = logging.getLogger(__name__)

# Bytes of pipelined requests kept while one is answered, before reading pauses.
PIPELINE_BYTES = 1 << 20
# A connection without a request in progress this long after it opened or after its last
# answer is closed (by default; aiohttp's keep-alive): idle clients, heads that never complete.
IDLE_TIMEOUT_S = 75.0
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    413: "Content Too Large",
    417: "Expectation Failed",
    431: "Request Header Fields Too Large",
    499: "Client Closed Request",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}


def response(status: int, body: bytes, *, close: bool, headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    """A whole JSON answer the gateway gives itself, head and body."""
    lines = [
        f"HTTP/1.1 {status} {REASONS.get(status, 'Unknown')}",
        "Content-Type: application/json; charset=utf-8",
        f"Content-Length: {len(body)}",
        f"Date: {formatdate(usegmt=True)}",
        *(f"{name}: {value}" for name, value in headers),
    ]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class Client(asyncio.Protocol):
    """One client connection."""

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.closed = False
        self.task: asyncio.Task[None] | None = None
        self.upstream: Upstream | None = None  # the replica connection its answer comes from now
        self.paused = False  # its socket's send buffer is full
        self._reading = True
        self._head: RequestHead | None = None
        self._reader: ChunkedReader | None = None
        self.idle_since = time.monotonic()  # when its last answer ended (or it opened)

    # -- the transport's callbacks -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not its subclasses
        self.listener.clients.add(self)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.task is None:
            self._next()
        elif len(self.buffer) > PIPELINE_BYTES and self._reading:
            self._reading = False
            assert self.transport is not None
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        return False  # a client that stops sending is gone (as aiohttp's server sees it)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.listener.clients.discard(self)
        if self.task is not None:
            self.task.cancel()

    def pause_writing(self) -> None:
        self.paused = True
        if self.upstream is not None:
            self.upstream.pause()

    def resume_writing(self) -> None:
        self.paused = False
        if self.upstream is not None:
            self.upstream.resume()

    # -- what the handler uses -----------------------------------------------------------------

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.write(data)

    def relay_from(self, upstream: Upstream | None) -> None:
        """The answer now comes from ``upstream``: it pauses while this client cannot take more."""
        self.upstream = upstream
        if upstream is not None and self.paused:
            upstream.pause()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    @property
    def stopping(self) -> bool:
        return self.listener.stopping

    # -- reading requests ----------------------------------------------------------------------

    def _next(self) -> None:
        """Read the next request from what came; hand it over once whole."""
        if self.closed or self.listener.stopping:
            return
        try:
            request = self._read()
        except HttpError as exc:
            self.listener.rejected(exc)
            self.write(response(exc.status, self.listener.error_body(exc), close=True))
            self.close()
            return
        if request is None:
            return
        head, body = request
        self.task = self.listener.loop.create_task(self._serve(head, body))

    def _read(self) -> tuple[RequestHead, bytes] | None:
        buffer = self.buffer
        head = self._head
        if head is None:
            while buffer[:2] == b"\r\n":  # blank lines between requests are ignored (RFC 9112 2.2)
                del buffer[:2]
            end = buffer.find(HEAD_END)
            if end < 0:
                if len(buffer) > MAX_HEAD_BYTES:
                    raise HttpError(
                        431,
                        "head_too_large",
                        f"request head larger than the gateway's limit of {MAX_HEAD_BYTES} bytes",
                    )
                return None
            head = parse_request_head(bytes(buffer[:end]))
            del buffer[: end + 4]
            limit = self.listener.max_body_bytes
            if head.content_length is not None and head.content_length > limit:
                raise HttpError(
                    413, "too_large", f"request body larger than the gateway's limit of {limit} bytes"
                )
            if head.chunked:
                self._reader = ChunkedReader(keep=True, limit=limit)
            if head.expect_continue and (head.chunked or head.content_length):
                self.write(_CONTINUE)
            self._head = head
        if self._reader is not None:
            used = self._reader.feed(buffer)
            del buffer[:used]
            if not self._reader.done:
                return None
            body = self._reader.body()
            self._reader = None
        elif head.content_length:
            if len(buffer) < head.content_length:
                return None
            body = bytes(buffer[: head.content_length])
            del buffer[: head.content_length]
        else:
            body = b""
        self._head = None
        return head, body

    async def _serve(self, head: RequestHead, body: bytes) -> None:
        keep = False
        try:
            keep = await self.listener.handler(self, head, body)
        except asyncio.CancelledError:
            return  # the client went away, or the drain ended
        except Exception:
            log.exception("request %s %s failed in the gateway", head.method, head.target[:200])
            self.abort()
            return
        finally:
            self.task = None
            self.upstream = None
            self.idle_since = time.monotonic()
        if not keep or not head.keep_alive or self.listener.stopping:
            self.close()
            return
        if not self._reading:
            self._reading = True
            assert self.transport is not None
            self.transport.resume_reading()
        if self.buffer:
            self._next()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()  # after what is written


Handler = Callable[[Client, RequestHead, bytes], Awaitable[bool]]


class Listener:
    """The data port: ``handler`` answers each request and says whether the connection stays open.
    Made in the event loop it serves on."""

    def __init__(
        self,
        handler: Handler,
        *,
        max_body_bytes: int,
        rejected: Callable[[HttpError], None],
        error_body: Callable[[HttpError], bytes],
        idle_timeout_s: float = IDLE_TIMEOUT_S,
    ) -> None:
        self.handler = handler
        self.max_body_bytes = max_body_bytes
        self.rejected = rejected  # told of each request refused for its framing
        self.error_body = error_body
        self.clients: set[Client] = set()
        self.idle_timeout_s = idle_timeout_s
        self.stopping = False
        self._sweeper: asyncio.TimerHandle | None = None
        self.server: asyncio.Server | None = None
        self.loop = asyncio.get_running_loop()  # kept: asking for it on each request costs a syscall

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port (0: a free port); the port it got."""
        self.server = await self.loop.create_server(lambda: Client(self), host, port, backlog=1024)
        self._sweep()
        return int(self.server.sockets[0].getsockname()[1])

    def _sweep(self) -> None:
        """Close the connections idle for ``idle_timeout_s``; again a third of it later."""
        now = time.monotonic()
        for client in [
            c for c in self.clients if c.task is None and now - c.idle_since > self.idle_timeout_s
        ]:
            client.close()
        self._sweeper = self.loop.call_later(self.idle_timeout_s / 3, self._sweep)

    async def drain(self, timeout_s: float) -> None:
        """Stop accepting; give requests in flight ``timeout_s`` to end, then cancel them."""
        self.stopping = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self.server is not None:
            self.server.close()
        for client in list(self.clients):
            if client.task is None:
                client.close()
        busy = [c.task for c in self.clients if c.task is not None]
        if busy:
            await asyncio.wait(busy, timeout=timeout_s)
        tasks = [c.task for c in self.clients if c.task is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)
        for client in list(self.clients):
            client.abort()
