"""The gateway's request path: admit, hold or route, forward, relay the answer unchanged.

The OpenAI endpoints the sidecar counts (``sidecar/openai.py``) are weighed (prompt
estimate + n x max_tokens, or the default), sent to the workload of their model
(``pool.py``; an unknown model gets 404) and routed by tokens among its replicas; a
request no replica can take now waits in that workload's hold queue, and its arrival
counts as the workload's demand while it waits. Any other path goes to a live replica
as it is, or gets 503 at once when there is none (it carries no demand worth waking a
workload for); ``GET /v1/models`` lists the models of every workload, named or announced.

Requests come whole from the data port (``listener.py``) and go to the replica on a kept-alive
connection (``upstream.py``), its head rebuilt with the end-to-end headers as they came; the
answer's bytes pass through as they come (a stream's events take its remaining tokens off the
replica). A request sent on a kept-alive connection that the replica closes before any byte of
an answer is sent once more, on a new connection (the sidecar closes idle connections; the
request may have crossed that close). A replica that refuses the connection, or closes a new
one before answering, is left out for a while and the request goes to another (or waits
again); one that breaks an answer off after its first byte breaks the client's off too, as a
sidecar does: the client sees what it would have seen talking to that replica.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gateway.config import GatewayConfig
from gateway.http1 import HttpError, RequestHead
from gateway.listener import Client, response
from gateway.metrics import GatewayMetrics
from gateway.pool import Pool, Pools, UnknownModel
from gateway.queue import QueueFull, Waiter
from gateway.router import Replica
from gateway.upstream import Exchange, Outcome, UpstreamPool
from sidecar import paths, wires
from sidecar.openai import Kind
from sidecar.tokens import LengthEstimate, prompt_tokens

if TYPE_CHECKING:
    from gateway.tracing import GatewayTracing, RouteTrace

log = logging.getLogger(__name__)

CLIENT_GONE = "499"
# A request is sent to at most this many replicas before the client gets the last error.
MAX_ATTEMPTS = 3
# Seconds an idle connection to a replica stays open (below the sidecar's idle timeout).
KEEPALIVE_S = 15.0


class Refused(Exception):
    """The gateway answers the request itself, with an error in the shape of the request's wire
    format (``wire``: OpenAI's unless the request is known to be another's)."""

    def __init__(self, status: int, reason: str, message: str, *, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.retry_after = retry_after
        self.wire = wires.OPENAI

    def body(self) -> bytes:
        type_ = "invalid_request_error" if self.status < 500 else "server_error"
        return self.wire.error_body(self.status, str(self), type_, self.reason, None)

    def render(self, *, close: bool = False) -> bytes:
        """The whole answer: head and body."""
        headers = () if self.retry_after is None else (("Retry-After", str(self.retry_after)),)
        return response(self.status, self.body(), close=close, headers=headers)


class Unreachable(Exception):
    """No connection to the replica could be made (refused, timed out, no route)."""


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
    """A request at a replica: what it still holds there."""

    pool: Pool
    replica: Replica
    outstanding: int  # weighted tokens booked on the replica
    remaining: int  # generation tokens a stream may still send


class GatewayProxy:
    def __init__(self, config: GatewayConfig, pools: Pools, metrics: GatewayMetrics) -> None:
        self.config = config
        self.pools = pools
        self.metrics = metrics
        self.counter = LengthEstimate()
        # Connections to each replica stay open between requests (as many as were in flight at
        # once); idle ones close after KEEPALIVE_S, before the sidecar's own idle timeout.
        self.upstreams = UpstreamPool(config.connect_timeout_s, KEEPALIVE_S)
        self.outstanding = 0
        self.tracing: GatewayTracing | None = None  # spans, when tracing is on (tracing.py)

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        self.upstreams.close()

    # -- admission -----------------------------------------------------------------------

    def _refuse(self, client: Client, refusal: Refused) -> bool:
        """Answer the request with the refusal; the connection stays open."""
        self.metrics.refused.labels(refusal.reason).inc()
        self.metrics.ended(str(refusal.status), False)
        close = client.stopping
        client.write(refusal.render(close=close))
        return not close

    def rejected(self, error: HttpError) -> None:
        """A request refused for its framing (the data port answers it and closes)."""
        self.metrics.refused.labels(error.reason).inc()
        self.metrics.ended(str(error.status), False)

    @staticmethod
    def error_body(error: HttpError) -> bytes:
        return Refused(error.status, error.reason, str(error)).body()

    def weigh(self, kind: Kind, body: bytes) -> Weighed:
        parsed = wires.parse_request(kind, body)
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

    async def handle(self, client: Client, head: RequestHead, body: bytes) -> bool:
        """Answer one request; whether the client's connection stays open."""
        if head.method == "GET" and head.target == "/v1/models":
            client.write(self._models(close=client.stopping))
            self.metrics.ended("200", False)
            return True
        # Classified as the sidecar will (its normalised path), which refuses what it cannot count.
        kind = paths.route(head.method, head.target).kind
        trace = None if self.tracing is None or kind is None else self.tracing.start(head)
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
                if trace is not None:
                    trace.weighed(weighed.model, pool.workload, weighed.tokens)
            return await self._forward(client, head, body, weighed, pool, trace)
        except Refused as refusal:
            if trace is not None:
                trace.refused(refusal.status, refusal.reason, str(refusal))
            refusal.wire = wires.of(kind)
            return self._refuse(client, refusal)
        except asyncio.CancelledError:
            if trace is not None:
                trace.gone()
            raise
        finally:
            if trace is not None:
                trace.end()

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

    def _models(self, *, close: bool) -> bytes:
        models = self.pools.models()
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "token-scaler"} for m in models]
        return response(200, json.dumps({"object": "list", "data": data}).encode(), close=close)

    async def _forward(
        self,
        client: Client,
        head: RequestHead,
        body: bytes,
        weighed: Weighed,
        pool: Pool,
        trace: RouteTrace | None = None,
    ) -> bool:
        held = False
        for attempt in range(1, MAX_ATTEMPTS + 1):
            if trace is not None:
                trace.holding()
            replica, waited = await self.admit(pool, weighed)
            held = held or waited
            flight = Flight(pool, replica, weighed.tokens, weighed.generation if weighed.stream else 0)
            sent = head if trace is None else trace.attempt(head, replica.url, waited)
            try:
                exchange = await self._exchange(client, sent, body, flight, weighed.stream)
                unanswered = exchange.detail if exchange.future.result() is Outcome.UNANSWERED else None
                if trace is not None:
                    trace.answered(exchange.status, exchange.future.result().value, exchange.detail)
            except Unreachable as exc:
                unanswered = str(exc)
                if trace is not None:
                    trace.answered(0, "unreachable", unanswered)
            except asyncio.CancelledError:
                self.metrics.ended(CLIENT_GONE, held)
                self._unbook(pool, replica, flight.outstanding)
                raise
            if unanswered is not None:
                # Refused, or a new connection closed before answering: that replica is going away.
                pool.router.mark_down(replica)
                self._unbook(pool, replica, flight.outstanding)
                if attempt == MAX_ATTEMPTS:
                    raise Refused(
                        503,
                        "replica_unavailable",
                        f"the replicas did not answer: {unanswered}",
                        retry_after=1,
                    )
                self.metrics.retries.inc()
                continue
            try:
                return self._ended(client, exchange, flight, held)
            finally:
                self._unbook(pool, replica, flight.outstanding)
        raise AssertionError("unreachable")

    def _ended(self, client: Client, exchange: Exchange, flight: Flight, held: bool) -> bool:
        """Count how the exchange ended and answer what is left to answer; whether the
        client's connection stays open."""
        outcome = exchange.future.result()
        if held and exchange.first_out is not None and flight.replica.first_held_answer_at is None:
            flight.replica.first_held_answer_at = exchange.first_out
        if outcome is Outcome.DONE:
            self.metrics.ended(str(exchange.status), held)
            return not exchange.close_client
        if outcome is Outcome.BROKEN:
            # The replica broke off mid-answer: so does the client's.
            self.metrics.broken.inc()
            self.metrics.ended("502", held)
            client.abort()
            return False
        status = 504 if outcome is Outcome.TIMEOUT else 502
        self.metrics.refused.labels("replica_error").inc()
        self.metrics.ended(str(status), held)
        refusal = Refused(status, "replica_error", f"bad answer from the replica: {exchange.detail}")
        close = client.stopping or exchange.close_client
        client.write(refusal.render(close=close))
        return not close

    async def _exchange(
        self, client: Client, head: RequestHead, body: bytes, flight: Flight, stream: bool
    ) -> Exchange:
        """The request sent to the flight's replica and its answer relayed: the ended exchange;
        ``Unreachable`` when no connection could be made."""
        url = flight.replica.url
        upstream = self.upstreams.idle(url)
        reused = upstream is not None
        request = self._request(head, body, url)
        loop = client.listener.loop
        while True:
            if upstream is None:
                try:
                    upstream = await self.upstreams.connect(url)
                except (OSError, TimeoutError) as exc:
                    raise Unreachable(f"cannot connect to {url}: {exc or type(exc).__name__}") from None
            exchange = Exchange(
                loop,
                client.write,
                progress=functools.partial(self._streamed, flight) if flight.remaining else None,
                head_only=head.method == "HEAD",
                whole=not stream,
                decode=head.minor == 0,
                keep_client=head.keep_alive and not client.stopping,
                read_timeout_s=self.config.read_timeout_s,
            )
            upstream.send(exchange, request, body)
            client.relay_from(upstream)
            try:
                await exchange.future
            except asyncio.CancelledError:
                exchange.abandon()
                raise
            finally:
                client.relay_from(None)
            if exchange.future.result() is Outcome.UNANSWERED and reused:
                # The replica closed a kept-alive connection as the request went out; no byte
                # of an answer came: once more, on a new connection.
                self.metrics.resent.inc()
                upstream, reused = None, False
                continue
            return exchange

    def _request(self, head: RequestHead, body: bytes, url: str) -> bytes:
        """The request's head as the replica gets it."""
        address = self.upstreams.address(url)
        length = (
            b"Content-Length: %d\r\n" % len(body)
            if body or head.content_length is not None or head.chunked
            else b""
        )
        return b"%s %s%s HTTP/1.1\r\nHost: %s\r\n%s%s\r\n" % (
            head.method.encode(),
            address.prefix,
            head.target.encode("latin-1"),
            address.host_header,
            head.forward,
            length,
        )

    def _streamed(self, flight: Flight, events: int) -> None:
        """Events of a stream went by: about one generated token each comes off the replica."""
        done = min(flight.remaining, events)
        if done:
            flight.remaining -= done
            flight.outstanding -= done
            flight.pool.router.progress(flight.replica, done)
            self.outstanding -= done
