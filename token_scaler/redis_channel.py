"""One Redis connection that pipelines every caller's commands (the policies' hot path).

Why not redis-py's client here: per command it takes a connection from its pool, wraps
the call in retry and timeout helpers, and writes with a syscall of its own. On the
sidecar's request path (one admit script per request, one settle script after it) that
machinery cost more CPU than Redis itself, and CPU on two cores is what the p99 pays.

A channel keeps one connection. Commands issued within one event-loop iteration leave in
one write at its end; a command a request waits on (``flush=True``: an admission) is
written at once, with everything queued before it (the settlements waiting ride along).
Redis answers a connection's commands in order, so replies are matched to their callers
first in, first out, and delivered in ``data_received`` itself: a script's reply is
converted there and the waiting task wakes once, without callback hops that would queue
behind the loop's other work. Packing and parsing are hiredis' (C). ``send`` and
``evalsha`` queue when called and return a future.

Failure: a lost connection fails every command waiting on it with ``ConnectionError``
(they may or may not have run: callers' scripts are idempotent or carry an id); the next
command connects again. A caller that stops waiting (a timeout) leaves its future behind:
the reply still arrives in order and is dropped. Error replies are returned as
``ResponseError`` values, not raised, so one bad command in a batch spoils nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import ssl
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import hiredis
import redis.connection
from redis.asyncio.connection import SSLConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from token_scaler.redis_conn import parse_redis_url

Arg = str | bytes | int | float


def _pack(args: tuple[Arg, ...]) -> bytes:
    # hiredis' stub types the argument as a 1-tuple; it takes any number of arguments.
    packed: bytes = hiredis.pack_command(args)  # type: ignore[arg-type]
    return packed


@dataclass(frozen=True)
class LuaScript:
    source: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode()).hexdigest())


# Called with (reply, None) or (None, error) when a command's reply arrives or it fails.
Deliver = Callable[[Any, BaseException | None], None]


def _into(future: asyncio.Future[Any]) -> Deliver:
    def deliver(reply: Any, error: BaseException | None) -> None:
        if future.done():  # its caller stopped waiting
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(reply)

    return deliver


def _ignore(reply: Any, error: BaseException | None) -> None:
    return None


def converting(future: asyncio.Future[Any], convert: Callable[[Any], Any] | None) -> Deliver:
    """Into ``future``, the reply passed through ``convert`` as it arrives (its exception, if
    it raises): the waiting task wakes once, with no callback hop in between."""

    def deliver(reply: Any, error: BaseException | None) -> None:
        if future.done():  # its caller stopped waiting
            return
        if error is not None:
            future.set_exception(error)
            return
        try:
            future.set_result(reply if convert is None else convert(reply))
        except Exception as exc:
            future.set_exception(exc)

    return deliver


class _Protocol(asyncio.Protocol):
    """One connection and the replies it owes: an abandoned connection's late replies and
    its close touch nothing of the connection that replaced it."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.reader = hiredis.Reader(replyError=ResponseError)
        self.waiting: deque[Deliver] = deque()  # sent on this connection, reply not read yet
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # A peer that vanished without a reset is found by the kernel, not in 15 minutes.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            if hasattr(socket, "TCP_USER_TIMEOUT"):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 10_000)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        waiting = self.waiting
        try:
            while (reply := self.reader.gets()) is not False:
                if not waiting:  # a reply nobody asked for: the stream is out of step
                    raise hiredis.ProtocolError("a reply nobody was waiting for")
                waiting.popleft()(reply, None)
        except hiredis.ProtocolError as exc:
            self.fail(RedisConnectionError(f"Redis protocol error: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(RedisConnectionError(f"connection to Redis lost: {exc or 'closed by the server'}"))

    def fail(self, error: Exception) -> None:
        """Close this connection and fail what it owes; the channel forgets it if current."""
        if self.transport is not None:
            self.transport.abort()
        waiting, self.waiting = self.waiting, deque()
        for deliver in waiting:
            deliver(None, error)
        self.channel._gone(self)


class Channel:
    """Commands to one Redis over one connection, pipelined. See the module's docstring."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 6379,
        path: str | None = None,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        connect_timeout_s: float = 2.0,
    ) -> None:
        self._host, self._port, self._path = host, port, path
        self._db, self._username, self._password = db, username, password
        self._ssl = ssl_context
        self._connect_timeout_s = connect_timeout_s
        self._current: _Protocol | None = None  # the connection in use
        self._connecting: asyncio.Task[None] | None = None
        self._queued: list[bytes] = []  # packed, not written yet
        self._queued_deliver: list[Deliver] = []
        self._flush_scheduled = False
        self._closed = False

    @classmethod
    def from_url(cls, url: str) -> Channel:
        """A channel to a ``redis://``, ``rediss://`` (TLS) or ``unix://`` URL, read by redis-py's
        own ``parse_url`` (``parse_redis_url``; query options such as ``ssl_cert_reqs`` included)."""
        kwargs = parse_redis_url(url)
        kind = kwargs.pop("connection_class", None)
        ssl_context = None
        if kind is not None and issubclass(kind, redis.connection.SSLConnection):
            # redis-py builds the context from the URL's ssl_* options; no connection is made
            ssl_context = SSLConnection(**kwargs).ssl_context.get()
        return cls(
            host=kwargs.get("host", "127.0.0.1"),
            port=int(kwargs.get("port", 6379)),
            path=kwargs.get("path"),
            db=int(kwargs.get("db", 0) or 0),
            username=kwargs.get("username"),
            password=kwargs.get("password"),
            ssl_context=ssl_context,
            connect_timeout_s=float(kwargs.get("socket_connect_timeout") or 2.0),
        )

    # -- sending

    def send(self, *args: Arg, flush: bool = False) -> asyncio.Future[Any]:
        """Queue one command now; the future holds its reply (a ``ResponseError`` for an error).

        ``flush``: write it, and all queued before it, now rather than at the end of this
        loop iteration (for a command a request waits on: it does not queue behind the
        rest of the iteration's work).
        """
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._enqueue(args, _into(future), flush)
        return future

    def evalsha(
        self,
        script: LuaScript,
        keys: Sequence[Arg],
        args: Sequence[Arg],
        *,
        convert: Callable[[Any], Any] | None = None,
        flush: bool = False,
    ) -> asyncio.Future[Any]:
        """Run a script by its digest, queued now; loaded and run again if Redis lacks it.

        A ``NOSCRIPT`` reply means the script did not run, so running it after the load
        runs it once. ``convert`` turns the reply into the future's result as it arrives
        (raising makes it the future's exception): the waiting task wakes once, with no
        callback hop in between.
        """
        outer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        command = ("EVALSHA", script.sha, len(keys), *keys, *args)
        self.run_script(script, command, converting(outer, convert), flush, wanted=lambda: not outer.done())
        return outer

    def run_script(
        self,
        script: LuaScript,
        command: tuple[Arg, ...],
        deliver: Deliver,
        flush: bool,
        *,
        wanted: Callable[[], bool] = lambda: True,
        retry: bool = True,
    ) -> None:
        """Queue ``command`` (an EVALSHA of ``script``); ``deliver`` gets its reply. A ``NOSCRIPT``
        reply loads the script and runs the command again, once, if its caller still waits
        (``wanted``)."""

        def reloaded(reply: Any, error: BaseException | None) -> None:
            if (
                retry
                and error is None
                and isinstance(reply, ResponseError)
                and str(reply).startswith("NOSCRIPT")
            ):
                if not wanted():
                    return
                self._enqueue(("SCRIPT", "LOAD", script.source), _ignore, False)
                self.run_script(script, command, deliver, True, wanted=wanted, retry=False)
                return
            deliver(reply, error)

        self._enqueue(command, reloaded, flush)

    def enqueue(self, args: tuple[Arg, ...], deliver: Deliver, flush: bool) -> None:
        """Queue one command; ``deliver`` gets its reply (for routing layers above the channel)."""
        self._enqueue(args, deliver, flush)

    def _enqueue(self, args: tuple[Arg, ...], deliver: Deliver, flush: bool) -> None:
        if self._closed:
            deliver(None, RedisConnectionError("the Redis channel is closed"))
            return
        self._queued.append(_pack(args))
        self._queued_deliver.append(deliver)
        if self._current is None:
            if self._connecting is None:
                self._connecting = asyncio.create_task(self._connect())
        elif flush:
            self._flush()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        current = self._current
        if current is None or current.transport is None or not self._queued:
            return
        data, self._queued = b"".join(self._queued), []
        current.waiting.extend(self._queued_deliver)
        self._queued_deliver = []
        current.transport.write(data)

    def reset(self) -> None:
        """Drop the connection (a caller gave up on a reply: the peer may be gone without a
        word); what it owes fails, the next command connects again."""
        if self._current is not None:
            self._current.fail(RedisConnectionError("connection to Redis reset: a reply took too long"))

    # -- the connection

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        protocol: _Protocol | None = None
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                if self._path is not None:
                    _, protocol = await loop.create_unix_connection(lambda: _Protocol(self), self._path)
                else:
                    _, protocol = await loop.create_connection(
                        lambda: _Protocol(self),
                        self._host,
                        self._port,
                        ssl=self._ssl,
                        server_hostname=self._host if self._ssl else None,
                    )
                assert protocol.transport is not None
                setup: list[tuple[Arg, ...]] = []
                if self._password is not None:
                    auth: tuple[Arg, ...] = (self._password,)
                    if self._username:
                        auth = (self._username, self._password)
                    setup.append(("AUTH", *auth))
                if self._db:
                    setup.append(("SELECT", self._db))
                replies = [loop.create_future() for _ in setup]
                # The handshake goes first, before anything callers queued meanwhile.
                protocol.waiting.extend(_into(reply) for reply in replies)
                protocol.transport.write(b"".join(_pack(c) for c in setup))
                for command, reply in zip(setup, replies, strict=True):
                    answer = await reply
                    if isinstance(answer, ResponseError):
                        raise RedisConnectionError(f"Redis refused {command[0]!s}: {answer}")
                if protocol.transport.is_closing():
                    raise RedisConnectionError("connection to Redis closed during the handshake")
        except BaseException as exc:
            self._connecting = None
            if protocol is not None:
                protocol.fail(RedisConnectionError("handshake abandoned"))
            if not isinstance(exc, OSError | TimeoutError | RedisConnectionError):
                self._fail_queued(RedisConnectionError(f"connecting to Redis failed: {exc!r}"))
                raise
            error = (
                exc
                if isinstance(exc, RedisConnectionError)
                else RedisConnectionError(f"cannot connect to Redis at {self._where}: {exc!r}")
            )
            self._fail_queued(error)
            return
        self._connecting = None
        if self._closed:
            protocol.fail(RedisConnectionError("the Redis channel is closed"))
            return
        self._current = protocol
        self._flush()

    @property
    def _where(self) -> str:
        return self._path or f"{self._host}:{self._port}"

    def _fail_queued(self, error: Exception) -> None:
        queued, self._queued_deliver, self._queued = self._queued_deliver, [], []
        for deliver in queued:
            deliver(None, error)

    def _gone(self, protocol: _Protocol) -> None:
        """A connection closed: if it was the one in use, the next command connects again."""
        if protocol is not self._current:
            return
        self._current = None
        if self._queued and self._connecting is None and not self._closed:
            self._connecting = asyncio.create_task(self._connect())

    async def close(self) -> None:
        self._closed = True
        if self._connecting is not None:
            with contextlib.suppress(Exception):
                await self._connecting
        if self._current is not None:
            self._current.fail(RedisConnectionError("the Redis channel is closed"))
        self._fail_queued(RedisConnectionError("the Redis channel is closed"))
