"""The gateway's request path: admit, hold or route, forward, stream back unchanged.

The OpenAI endpoints the sidecar counts (``sidecar/openai.py``) are weighed (prompt
estimate + n x max_tokens, or the default), sent to the workload of their model
(``pool.py``; an unknown model gets 404) and routed by tokens among its replicas; a
request no replica can take now waits in that workload's hold queue, and its arrival
counts as the workload's demand while it waits. Any other path goes to a live replica
as it is, or gets 503 at once when there is none (it carries no demand worth waking a
workload for); ``GET /v1/models`` lists the models of every workload, named or announced.

Responses pass through byte for byte (streams as they come). A replica that refuses
the connection, or closes it before answering, is left out for a while and the request
goes to another (or waits again); one that breaks a response off after its first byte
breaks the client's off too, as a sidecar does: the client sees what it would have
seen talking to that replica.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from gateway.config import GatewayConfig
from gateway.metrics import GatewayMetrics
from gateway.pool import Pool, Pools, UnknownModel
from gateway.queue import QueueFull, Waiter
from gateway.router import Replica
from sidecar import openai, paths
from sidecar.openai import Kind
from sidecar.responses import forward_headers
from sidecar.tokens import LengthEstimate, prompt_tokens

log = logging.getLogger(__name__)

_SKIP_AUTO = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")
_REQUEST_DROP = frozenset({"host", "content-length"})
_RESPONSE_DROP = frozenset({"content-length"})
CLIENT_GONE = "499"
# A request is sent to at most this many replicas before the client gets the last error.
MAX_ATTEMPTS = 3
# Seconds an idle connection to a replica stays open (below the sidecar's idle timeout).
KEEPALIVE_S = 15.0
# Answers with a Content-Length up to this are read whole and sent in one write.
WHOLE_BODY_BYTES = 1 << 20


class Refused(Exception):
    """The gateway answers the request itself, with an OpenAI-shaped error."""

    def __init__(self, status: int, reason: str, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.retry_after = retry_after

    def response(self) -> web.Response:
        type_ = "invalid_request_error" if self.status < 500 else "server_error"
        response = web.Response(
            status=self.status,
            body=openai.error_body(str(self), type_, self.reason),
            content_type="application/json",
        )
        if self.retry_after is not None:
            response.headers["Retry-After"] = str(self.retry_after)
        return response


@dataclass(slots=True)
class Weighed:
    model: str | None
    prompt: int
    generation: int
    stream: bool

    @property
    def tokens(self) -> int:
        return self.prompt + self.generation


@dataclass(slots=True)
class Flight:
    """A request at a replica: what it still holds there, and its status for the metrics."""

    pool: Pool
    replica: Replica
    outstanding: int  # weighted tokens booked on the replica
    remaining: int  # generation tokens a stream may still send
    code: str


class GatewayProxy:
    def __init__(self, config: GatewayConfig, pools: Pools, metrics: GatewayMetrics) -> None:
        self.config = config
        self.pools = pools
        self.metrics = metrics
        self.counter = LengthEstimate()
        self._session: aiohttp.ClientSession | None = None
        self.outstanding = 0

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            # Connections to each replica stay open between requests (as many as were in flight
            # at once), and idle ones close after KEEPALIVE_S: before the sidecar's own idle
            # timeout (--header-timeout, 30 s by default), so this side closes an idle connection
            # first and never sends a request on one the sidecar is closing (that request would
            # fail as if the replica were going away).
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_S),
            timeout=aiohttp.ClientTimeout(
                total=None, connect=self.config.connect_timeout_s, sock_read=self.config.read_timeout_s
            ),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "GatewayProxy.start() was not awaited"
        return self._session

    # -- admission -----------------------------------------------------------------------

    def _refuse(self, refusal: Refused) -> web.Response:
        self.metrics.refused.labels(refusal.reason).inc()
        self.metrics.ended(str(refusal.status), False)
        return refusal.response()

    def weigh(self, kind: Kind, body: bytes) -> Weighed:
        parsed = openai.parse_request(kind, body)
        if parsed is None:
            raise Refused(400, "bad_request", "the request body is not a JSON object")
        generation = 0
        if kind is not Kind.EMBEDDINGS:
            generation = parsed.n * (parsed.max_tokens or self.config.default_generation_tokens)
        return Weighed(parsed.model, prompt_tokens(self.counter, parsed), generation, parsed.stream)

    def _placer(self, pool: Pool) -> Callable[[Waiter], Replica | None]:
        def place(waiter: Waiter) -> Replica | None:
            """Pick and book (synchronously, so the next pick sees it)."""
            replica = pool.router.pick(waiter.model, waiter.tokens)
            if replica is not None:
                self._book(pool, replica, waiter.tokens)
                if replica.first_held_at is None:
                    replica.first_held_at = time.monotonic()
            return replica

        return place

    def _book(self, pool: Pool, replica: Replica, tokens: int) -> None:
        pool.router.start(replica, tokens)
        self.outstanding += tokens

    def _unbook(self, pool: Pool, replica: Replica, outstanding: int) -> None:
        pool.router.finish(replica, outstanding)
        self.outstanding -= outstanding
        self.dispatch(pool)

    def dispatch(self, pool: Pool) -> None:
        """Hand the pool's replicas to its held requests, if any can take them now."""
        if len(pool.queue):
            pool.queue.dispatch(self._placer(pool))
            self._gauge_queue(pool)
        self.metrics.outstanding.set(self.outstanding)

    def _gauge_queue(self, pool: Pool) -> None:
        self.metrics.queue_requests.labels(pool.workload).set(len(pool.queue))
        self.metrics.queue_tokens.labels(pool.workload).set(pool.queue.tokens)
        self.metrics.queue_oldest.labels(pool.workload).set(pool.queue.oldest_wait())

    async def admit(self, pool: Pool, weighed: Weighed) -> tuple[Replica, bool]:
        """A replica booked for the request, at once or after waiting; (replica, waited)."""
        started = time.perf_counter()
        queue = pool.queue
        replica = None if len(queue) else pool.router.pick(weighed.model, weighed.tokens)
        self.metrics.route.observe(time.perf_counter() - started)
        if replica is not None:
            self._book(pool, replica, weighed.tokens)
            return replica, False
        try:
            waiter = queue.add(weighed.model, weighed.tokens)
        except QueueFull as exc:
            raise Refused(503, "queue_full", str(exc), retry_after=self.config.retry_after_s) from None
        held = pool.demand.hold(weighed.model or "unknown", weighed.prompt, weighed.generation)
        if pool.demand.held == 1:
            pool.writer.wake()
        self.dispatch(pool)  # another model's replica may have room: keep order, not capacity idle
        try:
            await asyncio.wait({waiter.future}, timeout=self.config.queue_timeout_s)
        except asyncio.CancelledError:
            self._leave_queue(pool, waiter)
            raise
        finally:
            pool.demand.release(held)
            self.metrics.wait.labels(pool.workload).observe(time.monotonic() - waiter.arrived)
        if not waiter.future.done():
            self._leave_queue(pool, waiter)
            raise Refused(
                503,
                "queue_timeout",
                f"no replica of {pool.workload} could take the request within "
                f"{self.config.queue_timeout_s:g}s (the workload may be starting from zero)",
                retry_after=self.config.retry_after_s,
            )
        failure = waiter.future.exception()
        if isinstance(failure, Refused):
            raise failure
        return waiter.future.result(), True

    def _leave_queue(self, pool: Pool, waiter: Waiter) -> None:
        if pool.queue.remove(waiter):
            waiter.future.cancel()
        elif waiter.future.done() and not waiter.future.cancelled() and waiter.future.exception() is None:
            # Handed a replica just as it left: give the booking back.
            self._unbook(pool, waiter.future.result(), waiter.tokens)
        self._gauge_queue(pool)

    # -- the request path ------------------------------------------------------------------

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if request.content_length is not None and request.content_length > self.config.max_body_bytes:
            return self._refuse(self._too_large())
        if request.method == "GET" and request.path == "/v1/models":
            return self._models()
        # Classified as the sidecar will (its normalised path), which refuses what it cannot count.
        kind = paths.route(request.method, request.raw_path).kind
        body = await self._read_body(request)
        if body is None:
            return self._refuse(self._too_large())
        try:
            if kind is None:
                weighed = Weighed(None, 0, 0, False)
                pool = self._any_live()
            else:
                weighed = self.weigh(kind, body)
                try:
                    pool = self.pools.resolve(weighed.model)
                except UnknownModel as exc:
                    raise Refused(
                        404,
                        "model_not_found",
                        f"{exc}; this gateway serves: {', '.join(self.pools.models()) or 'no model yet'}",
                    ) from None
            return await self._forward(request, body, weighed, pool)
        except Refused as refusal:
            return self._refuse(refusal)

    def _any_live(self) -> Pool:
        """The first workload with a replica that can take a request now (paths it does not count)."""
        for pool in self.pools:
            if pool.router.pick(None, 0) is not None:
                return pool
        raise Refused(
            503,
            "no_replica",
            "no replica is live; only the OpenAI endpoints wait for one",
            retry_after=self.config.retry_after_s,
        )

    def _too_large(self) -> Refused:
        return Refused(
            413,
            "too_large",
            f"request body larger than the gateway's limit of {self.config.max_body_bytes} bytes",
        )

    async def _read_body(self, request: web.BaseRequest) -> bytes | None:
        """The whole body; None past the limit (a declared length was checked against it)."""
        if request.content_length is not None:
            return await request.content.readexactly(request.content_length)
        parts: list[bytes] = []
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
            if size > self.config.max_body_bytes:
                return None
            parts.append(chunk)
        return b"".join(parts)

    def _models(self) -> web.Response:
        models = self.pools.models()
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "token-scaler"} for m in models]
        return web.json_response({"object": "list", "data": data})

    async def _forward(
        self, request: web.BaseRequest, body: bytes, weighed: Weighed, pool: Pool
    ) -> web.StreamResponse:
        headers = forward_headers(request.headers, drop=_REQUEST_DROP)
        held = False
        for attempt in range(1, MAX_ATTEMPTS + 1):
            replica, waited = await self.admit(pool, weighed)
            held = held or waited
            try:
                upstream = await self.session.request(
                    request.method,
                    replica.url + request.raw_path,
                    headers=headers,
                    data=body,
                    skip_auto_headers=_SKIP_AUTO,
                    allow_redirects=False,
                )
            except (aiohttp.ClientConnectorError, aiohttp.ServerDisconnectedError) as exc:
                # Refused, or closed before answering: that replica is going away.
                pool.router.mark_down(replica)
                self._unbook(pool, replica, weighed.tokens)
                if attempt == MAX_ATTEMPTS:
                    raise Refused(
                        503, "replica_unavailable", f"the replicas did not answer: {exc}", retry_after=1
                    ) from None
                self.metrics.retries.inc()
                continue
            except (TimeoutError, aiohttp.ClientError) as exc:
                self._unbook(pool, replica, weighed.tokens)
                status = 504 if isinstance(exc, TimeoutError) else 502
                raise Refused(status, "replica_error", f"bad answer from the replica: {exc}") from None
            except asyncio.CancelledError:
                self._unbook(pool, replica, weighed.tokens)
                self.metrics.ended(CLIENT_GONE, held)
                raise
            flight = Flight(
                pool,
                replica,
                weighed.tokens,
                weighed.generation if weighed.stream else 0,
                str(upstream.status),
            )
            return await self._relay(request, upstream, flight, weighed.stream, held)
        raise AssertionError("unreachable")

    async def _relay(
        self,
        request: web.BaseRequest,
        upstream: aiohttp.ClientResponse,
        flight: Flight,
        stream: bool,
        held: bool,
    ) -> web.StreamResponse:
        try:
            async with upstream:
                length = upstream.content_length
                if length is not None and length <= WHOLE_BODY_BYTES and not stream:
                    response: web.StreamResponse = await self._whole(upstream, flight)
                else:
                    response = await self._passthrough(request, upstream, flight, held)
                if held and flight.replica.first_held_answer_at is None:
                    flight.replica.first_held_answer_at = time.monotonic()
                return response
        except asyncio.CancelledError:
            flight.code = CLIENT_GONE
            raise
        finally:
            self.metrics.ended(flight.code, held)
            self._unbook(flight.pool, flight.replica, flight.outstanding)

    async def _whole(self, upstream: aiohttp.ClientResponse, flight: Flight) -> web.Response:
        """A whole answer goes out in one write (headers and body), not three."""
        try:
            body = await upstream.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            flight.code = "502"
            self.metrics.refused.labels("replica_error").inc()
            return Refused(502, "replica_error", f"bad answer from the replica: {exc}").response()
        return web.Response(
            status=upstream.status,
            reason=upstream.reason,
            headers=forward_headers(upstream.headers, drop=_RESPONSE_DROP),
            body=body,
        )

    async def _passthrough(
        self, request: web.BaseRequest, upstream: aiohttp.ClientResponse, flight: Flight, held: bool
    ) -> web.StreamResponse:
        """Bytes as they come; a stream's events take its remaining tokens off the replica."""
        response = web.StreamResponse(
            status=upstream.status,
            reason=upstream.reason,
            headers=forward_headers(upstream.headers, drop=_RESPONSE_DROP),
        )
        if upstream.content_length is not None:
            response.content_length = upstream.content_length
        await response.prepare(request)
        if held and flight.replica.first_held_answer_at is None:
            flight.replica.first_held_answer_at = time.monotonic()  # its first bytes went out
        try:
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
                if flight.remaining:
                    # about one generated token per event of a stream
                    done = min(flight.remaining, chunk.count(b"data:"))
                    flight.remaining -= done
                    flight.outstanding -= done
                    flight.pool.router.progress(flight.replica, done)
                    self.outstanding -= done
        except (TimeoutError, aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError):
            # The replica broke off mid-answer: so does the client's.
            self.metrics.broken.inc()
            flight.code = "502"
            if request.transport is not None:
                request.transport.close()
            return response
        except ConnectionResetError:
            flight.code = CLIENT_GONE
            return response
        await response.write_eof()
        return response
