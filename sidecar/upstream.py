"""The model server's side of the proxy: one client session, and what passes it uncounted.

Requests go out on the path as it was routed on (``TARGET``, set by intake.py), not as the
client spelled it. A request is sent once more when the server closed a kept-alive connection
without answering (``send``). Any method or path the sidecar does not count is streamed both
ways, byte for byte (``passthrough``).

An ``https://`` upstream (a hosted API: the sidecar as an egress proxy) is verified as any
TLS client verifies: against the system's CAs (``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` honoured),
or against the CAs of ``ca_file`` alone when given. Verification cannot be turned off.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from prometheus_client import Counter

from sidecar.responses import (
    STREAM_REQUEST_DROP,
    Errors,
    abort_client,
    forward_headers,
)

# The normalised path and query (paths.route), as forwarded.
TARGET = web.RequestKey("tokenscaler.target", str)
# aiohttp's client adds these unless told not to; a transparent proxy adds nothing.
_SKIP_AUTO = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


class Upstream:
    def __init__(
        self,
        base: str,
        errors: Errors,
        retries: Counter,
        *,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 600.0,
        ca_file: Path | None = None,
    ) -> None:
        self.base = base.rstrip("/")
        # Made here, not at import: the system's CAs as the environment names them at start-up.
        self._ssl = ssl.create_default_context(cafile=ca_file)
        self.errors = errors
        self.retries = retries
        self._timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout_s, sock_read=read_timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            # Idle upstream connections are dropped before uvicorn's (vLLM's) 5 s keep-alive
            # closes them, so a request never goes out on a connection the server is closing.
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=4, ssl=self._ssl),
            timeout=self._timeout,
            auto_decompress=False,  # passthrough bytes stay as the upstream encoded them
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "Proxy.start() was not awaited"
        return self._session

    def url(self, request: web.Request, upstream: str | None = None) -> str:
        """The upstream URL: the path as routed on (paths.py), not as the client spelled it."""
        target: str = request.get(TARGET, request.raw_path)
        return (upstream or self.base) + target

    async def send(
        self, method: str, url: str, headers: CIMultiDict[str], data: object
    ) -> aiohttp.ClientResponse:
        """The upstream request, retried once when the server closed the connection without
        answering: a model server that closes a kept-alive connection while still advertising
        keep-alive (llama.cpp's server after a stream) leaves a dead connection in the pool,
        and a request sent on it fails before the server read it. A body still streaming from
        the client cannot be sent twice, so those are not retried."""
        for attempt in (1, 2):
            try:
                return await self.session.request(
                    method,
                    url,
                    headers=headers,
                    data=data,
                    skip_auto_headers=_SKIP_AUTO,
                    allow_redirects=False,
                )
            except aiohttp.ClientConnectorError:
                raise  # no connection at all: nothing was dropped, the server is not there
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
                # the dead connection shows as a disconnect before the answer, or as a failed
                # write of the request body ("Can not write request body")
                if attempt == 2 or not (data is None or isinstance(data, bytes)):
                    raise
                self.retries.inc()
        raise AssertionError("unreachable")

    async def passthrough(self, request: web.Request) -> web.StreamResponse:
        """Any method or path not counted: the body streams to the server as it arrives."""
        headers = forward_headers(request.headers, drop=STREAM_REQUEST_DROP)
        data = request.content if request.body_exists else None
        try:
            upstream = await self.send(request.method, self.url(request), headers, data)
        except (TimeoutError, aiohttp.ClientError) as exc:
            return self.errors.upstream(exc)
        async with upstream:
            response = web.StreamResponse(
                status=upstream.status,
                reason=upstream.reason,
                headers=forward_headers(upstream.headers),
            )
            if upstream.content_length is not None:
                response.content_length = upstream.content_length
            await response.prepare(request)
            try:
                async for data_chunk in upstream.content.iter_any():
                    await response.write(data_chunk)
            except (TimeoutError, aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError):
                abort_client(request)
                return response
            except ConnectionResetError:  # the client left; leaving the block closes the upstream
                return response
            await response.write_eof()
            return response
