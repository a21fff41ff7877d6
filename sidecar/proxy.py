"""The reverse proxy: forwards everything, counts the OpenAI endpoints it understands.

Three paths:
- passthrough: any other method or path, streamed both ways, uncounted;
- counted, non-streamed: the response is read whole, its ``usage`` counted, the same
  bytes sent on;
- counted, streamed (SSE): events pass as they complete, counted as they pass, and the
  final ``usage`` settles the request. When the client did not ask for usage the sidecar
  asks the upstream for it and removes it again, so the client's bytes are unchanged.

The path is normalised before it is routed on and forwarded in that form (paths.py); a
counted request whose body two parsers could read differently is refused with 400
(request_rules.py), so the model server generates by the values the sidecar metered.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from sidecar import openai, paths, request_rules
from sidecar.abandon import Abandoned
from sidecar.labels import OTHER, ModelLabels
from sidecar.meter import LabelBound, Meter, Request
from sidecar.metrics import Metrics, Series
from sidecar.openai import Kind, ParsedRequest, Usage
from sidecar.policy.engine import Admission, PolicyEngine
from sidecar.request_rules import Refusal
from sidecar.sse import Event, SSEParser
from sidecar.tokens import TokenCounter, count_texts, prompt_tokens
from sidecar.usage_bounds import RequestFacts, UsageGuard, request_facts, text_bytes

log = logging.getLogger(__name__)

# RFC 9110 7.6.1: meaningful for one connection only, never forwarded.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
# aiohttp's client adds these unless told not to; a transparent proxy adds nothing.
_SKIP_AUTO = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")
_T = TypeVar("_T")
# Bodies this large are parsed in a worker thread (the loop serves meanwhile), one at a time.
LARGE_BODY_BYTES = 256 << 10
CLIENT_GONE = "499"
_TARGET = web.RequestKey(
    "tokenscaler.target", str
)  # the normalised path and query (paths.route)  # nginx's code for a client that closed the connection first


def forward_headers(
    headers: CIMultiDictProxy[str], *, drop: frozenset[str] = frozenset()
) -> CIMultiDict[str]:
    named = {token.strip().lower() for token in headers.get("Connection", "").split(",")}
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lower = name.lower()
        if lower not in HOP_BY_HOP and lower not in named and lower not in drop:
            out.add(name, value)
    return out


_REQUEST_DROP = frozenset({"host", "content-length"})
_STREAM_REQUEST_DROP = frozenset({"host"})
_RESPONSE_DROP = frozenset({"content-length"})


def error_response(status: int, message: str, type_: str, code: str) -> web.Response:
    return web.Response(
        status=status,
        body=openai.error_body(message, type_, code),
        content_type="application/json",
    )


@dataclass(slots=True)
class _Exchange:
    """What a counted request has seen so far."""

    kind: Kind
    inject: bool  # the sidecar asked for usage: remove it from what the client sees
    started: float
    series: Series
    name: str  # the model asked for (``series`` has its label)
    code: str = "502"
    failed: bool = False
    usage: Usage | None = None
    pieces: int = 0
    texts: list[str] = field(default_factory=list)
    malformed: bool = False
    streamed: bool = False
    first_at: float | None = None
    upstream: str | None = None  # another model server than the proxy's (a downgrade)
    headers: dict[str, str] | None = None  # the policies' response headers
    stream_limit: int | None = None  # generated pieces after which the stream is ended
    cut: bool = False
    facts: RequestFacts | None = None  # what bounds the usage (sidecar/usage_bounds.py)
    seen_bytes: int = 0  # bytes of generated text that passed (see usage_bounds)
    reserved: int | None = None  # generated tokens charged if a non-streamed client leaves (abandon.py)


def _abort_client(request: web.Request) -> None:
    """End the client's connection without a proper end of body, as a broken upstream would.

    What was written is flushed first; aiohttp's own ``write_eof`` then meets a closing
    transport, which it takes as a client that went away.
    """
    if request.transport is not None:
        request.transport.close()


class Proxy:
    def __init__(
        self,
        *,
        upstream: str,
        meter: Meter,
        metrics: Metrics,
        counter: TokenCounter,
        tenant_header: str = "X-Tenant-ID",
        max_tenants: int = 100,
        max_models: int = 32,
        max_body_bytes: int = 16 << 20,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 600.0,
        policy: PolicyEngine | None = None,
        models: Sequence[str] | None = None,
        body_timeout_s: float = 60.0,
    ) -> None:
        self.upstream = upstream.rstrip("/")
        self.policy = policy
        # Requests a downgrade sends to another model server are that server's demand, not
        # this workload's: their counts go to a meter whose snapshots are discarded.
        self.elsewhere = Meter()
        self.meter = meter
        self.metrics = metrics
        self.counter = counter
        self.guard = UsageGuard(metrics.usage_implausible)
        self.tenant_header = tenant_header
        self.tenants = LabelBound(max_tenants)
        self.models = ModelLabels(max_models, models)
        self.max_body_bytes = max_body_bytes
        self.abandoned = Abandoned()
        self.body_timeout_s = body_timeout_s
        self._large = asyncio.Semaphore(1)
        self._timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout_s, sock_read=read_timeout_s)
        self._session: aiohttp.ClientSession | None = None
        # Keep generated text only when a tokenizer can make something of it.
        self._keep_texts = counter.name == "tokenizer"

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            # Idle upstream connections are dropped before uvicorn's (vLLM's) 5 s keep-alive
            # closes them, so a request never goes out on a connection the server is closing.
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=4),
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

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.content_length is not None and request.content_length > self.max_body_bytes:
            return self._too_large()
        target = paths.route(request.method, request.raw_path)
        if target.refusal is not None:
            return self._bad_request(Refusal(None, target.refusal, "invalid_path"))
        request[_TARGET] = target.forward
        if target.kind is None:
            return await self._passthrough(request)
        try:
            async with asyncio.timeout(self.body_timeout_s):
                body = await self._read_body(request)
        except TimeoutError:
            self.metrics.rejected.labels("408").inc()
            message = f"the request body did not arrive within {self.body_timeout_s:g} s"
            return error_response(408, message, "invalid_request_error", "request_timeout")
        if body is None:
            return self._too_large()
        parsed = await self._off_loop(len(body), request_rules.check, target.kind, body)
        if isinstance(parsed, Refusal):
            return self._bad_request(parsed)
        return await self._counted(request, parsed, body)

    def _bad_request(self, refusal: Refusal) -> web.Response:
        self.metrics.rejected.labels("400").inc()
        return web.Response(status=400, body=refusal.body(), content_type="application/json")

    def _too_large(self) -> web.Response:
        self.metrics.rejected.labels("413").inc()
        return error_response(
            413,
            f"request body larger than the sidecar's limit of {self.max_body_bytes} bytes",
            "invalid_request_error",
            "request_too_large",
        )

    async def _read_body(self, request: web.Request) -> bytes | None:
        parts: list[bytes] = []
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            parts.append(chunk)
        return b"".join(parts)

    def _url(self, request: web.Request, upstream: str | None = None) -> str:
        """The upstream URL: the path as routed on (paths.py), not as the client spelled it."""
        target: str = request.get(_TARGET, request.raw_path)
        return (upstream or self.upstream) + target

    async def _send(
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
                self.metrics.upstream_retries.inc()
        raise AssertionError("unreachable")

    def _upstream_error(self, exc: BaseException) -> web.Response:
        if isinstance(exc, asyncio.TimeoutError):
            status, message, code = 504, "the model server did not answer in time", "upstream_timeout"
        elif isinstance(exc, aiohttp.ClientConnectorError):
            status, message, code = 503, "the model server is not reachable", "upstream_unavailable"
        else:
            status, message, code = 502, f"bad answer from the model server: {exc}", "upstream_error"
        self.metrics.rejected.labels(str(status)).inc()
        return error_response(status, message, "server_error", code)

    async def _passthrough(self, request: web.Request, body: bytes | None = None) -> web.StreamResponse:
        if body is None:
            headers = forward_headers(request.headers, drop=_STREAM_REQUEST_DROP)
            data: object = request.content if request.body_exists else None
        else:
            headers = forward_headers(request.headers, drop=_REQUEST_DROP)
            data = body
        try:
            upstream = await self._send(request.method, self._url(request), headers, data)
        except (TimeoutError, aiohttp.ClientError) as exc:
            return self._upstream_error(exc)
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
                _abort_client(request)
                return response
            except ConnectionResetError:  # the client left; leaving the block closes the upstream
                return response
            await response.write_eof()
            return response

    def _refused(self, admission: Admission) -> web.Response:
        rejection = admission.rejection
        assert rejection is not None
        self.metrics.rejected.labels(str(rejection.status)).inc()
        response = error_response(rejection.status, rejection.message, rejection.type, rejection.code)
        response.headers.update(rejection.headers)
        return response

    async def _off_loop(self, size: int, work: Callable[..., _T], *args: Any) -> _T:
        """Work on a body: at once when it is small; a large one in a worker thread, one at a
        time, so the loop keeps serving meanwhile and parsing holds one large body's objects."""
        if size < LARGE_BODY_BYTES:
            return work(*args)
        async with self._large:
            return await asyncio.to_thread(work, *args)

    async def _counted(self, request: web.Request, parsed: ParsedRequest, body: bytes) -> web.StreamResponse:
        prompt = await self._off_loop(len(body), prompt_tokens, self.counter, parsed)
        sent = body
        admission = None
        max_tokens = parsed.max_tokens
        meter = self.meter
        if self.policy is None:
            name = parsed.model or "unknown"
            tenant = self.tenants(request.headers.get(self.tenant_header) or "none")
        else:
            admission = await self.policy.admit(request.headers, parsed, body, prompt)
            if admission.rejection is not None:
                return self._refused(admission)
            body, max_tokens = admission.body, admission.max_tokens
            name = admission.model or "unknown"
            tenant = self.tenants(admission.tenant)
            if admission.upstream is not None:
                meter = self.elsewhere
        model = self.models(name)
        inject = False
        if parsed.stream and parsed.kind in openai.USAGE_OPT_IN and not parsed.wants_usage:
            layout = parsed.layout if body is sent else None  # a policy's rewrite moved things
            size = 0 if layout is not None else len(body)
            asked = await self._off_loop(size, openai.with_usage_requested, body, layout)
            if asked is not None:
                body, inject = asked, True
        generation = 0
        if parsed.kind is not Kind.EMBEDDINGS:
            generation = meter.generation_estimate(model, max_tokens, parsed.n)
        metered = meter.arrive(model, tenant, prompt, generation, parsed.n)
        exchange = _Exchange(parsed.kind, inject, time.monotonic(), self.metrics.series(model, tenant), name)
        exchange.facts = request_facts(parsed, body, max_tokens)
        if not parsed.stream:
            exchange.reserved = max_tokens * parsed.n if max_tokens is not None else generation
        if admission is not None:
            exchange.upstream = admission.upstream
            exchange.headers = admission.headers
            exchange.stream_limit = admission.stream_limit
        exchange.series.inflight.inc()
        exchange.series.waiting.inc()
        try:
            return await self._exchange(request, body, metered, exchange, admission)
        except asyncio.CancelledError:
            # The client went away (aiohttp cancels the handler) or the drain timed out.
            exchange.code = CLIENT_GONE
            exchange.failed = True
            raise
        finally:
            prompt, generation = self._settle(meter, metered, exchange)
            if admission is not None and self.policy is not None:
                if exchange.cut:
                    self.policy.metrics.stream_cuts.labels(tenant).inc()
                self.policy.settle(admission, prompt, generation)

    async def _exchange(
        self,
        request: web.Request,
        body: bytes,
        metered: Request,
        exchange: _Exchange,
        admission: Admission | None,
    ) -> web.StreamResponse:
        url = self._url(request, exchange.upstream)
        try:
            # Counting needs the body readable: no compression on counted endpoints.
            headers = forward_headers(request.headers, drop=_REQUEST_DROP | {"accept-encoding"})
            upstream = await self._send("POST", url, headers, body)
        except (TimeoutError, aiohttp.ClientError) as exc:
            response = self._upstream_error(exc)
            exchange.code = str(response.status)
            exchange.failed = True
            return response
        async with upstream:
            exchange.code = str(upstream.status)
            exchange.failed = upstream.status >= 400
            if not exchange.failed and metered.model == OTHER:
                self._labelled(metered, exchange)
            if upstream.headers.get("Content-Type", "").startswith("text/event-stream"):
                return await self._stream(request, upstream, metered, exchange, admission)
            return await self._complete(upstream, exchange)

    def _labelled(self, metered: Request, exchange: _Exchange) -> None:
        """The server answers a model not yet a label: it becomes one, with this request (labels.py)."""
        label = self.models.confirm(exchange.name)
        if label == metered.model:
            return
        (self.meter if exchange.upstream is None else self.elsewhere).relabel(metered, label)
        old = exchange.series
        old.inflight.dec()
        old.waiting.dec()
        exchange.series = self.metrics.series(label, metered.tenant)
        exchange.series.inflight.inc()
        exchange.series.waiting.inc()

    async def _complete(self, upstream: aiohttp.ClientResponse, exchange: _Exchange) -> web.StreamResponse:
        try:
            body = await upstream.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            exchange.failed = True
            response = self._upstream_error(exc)
            exchange.code = str(response.status)
            return response
        if not exchange.failed:
            parsed = openai.parse_response(exchange.kind, body)
            exchange.seen_bytes = len(body)
            if parsed is None:
                exchange.malformed = True
            else:
                exchange.usage = parsed.usage
                exchange.texts.extend(parsed.texts)
                exchange.pieces = len(parsed.texts)
        response = web.Response(
            status=upstream.status,
            reason=upstream.reason,
            headers=forward_headers(upstream.headers, drop=_RESPONSE_DROP),
            body=body,
        )
        if exchange.headers:
            response.headers.update(exchange.headers)
        return response

    async def _stream(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        metered: Request,
        exchange: _Exchange,
        admission: Admission | None,
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            status=upstream.status,
            reason=upstream.reason,
            headers=forward_headers(upstream.headers, drop=_RESPONSE_DROP),
        )
        if exchange.headers:
            response.headers.update(exchange.headers)
        await response.prepare(request)
        exchange.streamed = True
        parser = SSEParser()
        try:
            async for data in upstream.content.iter_any():
                out = [self._event(event, metered, exchange) for event in parser.feed(data)]
                if exchange.cut and admission is not None:
                    # Past its reservation: end the client's stream cleanly, and the upstream's.
                    out.append(
                        openai.stop_event(
                            exchange.kind,
                            admission.stream_mode,
                            "token budget exhausted: the stream reached its budget reservation",
                        )
                    )
                    await response.write(b"".join(out))
                    await response.write_eof()
                    return response
                if out:
                    await response.write(b"".join(out))
            tail = parser.close()
            if tail is not None:
                await response.write(self._event(tail, metered, exchange))
        except (TimeoutError, aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError):
            # The upstream broke off mid-stream: so does the client's stream.
            exchange.code = "502"
            exchange.failed = True
            _abort_client(request)
            return response
        except ConnectionResetError:
            exchange.code = CLIENT_GONE
            exchange.failed = True
            return response
        await response.write_eof()
        return response

    def _event(self, event: Event, metered: Request, exchange: _Exchange) -> bytes:
        """Count one event; return the bytes the client gets for it."""
        if exchange.cut:
            return b""
        if event.malformed:
            exchange.malformed = True
        if event.data is None:
            return event.raw
        chunk = openai.parse_chunk(exchange.kind, event.data)
        if chunk is None:
            exchange.malformed = True
            exchange.seen_bytes += len(event.raw)
            return event.raw
        if chunk.pieces:
            exchange.seen_bytes += text_bytes(chunk.texts)
        elif chunk.usage is None or not exchange.pieces:
            # the usage event repeats what passed in pieces before it (or holds nothing)
            exchange.seen_bytes += len(event.raw)
        if chunk.pieces:
            limit = exchange.stream_limit
            if limit is not None and exchange.pieces + chunk.pieces > limit:
                exchange.cut = True
                return b""
            if exchange.first_at is None:
                exchange.first_at = time.monotonic()
                exchange.series.waiting.dec()
            exchange.pieces += chunk.pieces
            meter = self.meter if exchange.upstream is None else self.elsewhere
            meter.generated(metered, chunk.pieces)
            if self._keep_texts:
                exchange.texts.extend(chunk.texts)
        if chunk.usage is not None:
            exchange.usage = chunk.usage
        if exchange.inject:
            if chunk.usage_only:
                return b""
            if chunk.null_usage:
                return openai.strip_null_usage(event.raw)
        return event.raw

    def _own_generation(self, exchange: _Exchange) -> int:
        """Generated tokens as the sidecar counted them: a whole answer's text (or a stream's,
        with a tokenizer) through the token counter, else one token per streamed piece."""
        if self._keep_texts or not exchange.streamed:
            return count_texts(self.counter, exchange.texts)
        return exchange.pieces

    def _settle(self, meter: Meter, metered: Request, exchange: _Exchange) -> tuple[int, int]:
        """Final counts: usage, else the fallback count; after a failure, what was served."""
        model, tenant = metered.model, metered.tenant
        series = exchange.series
        now = time.monotonic()
        if exchange.first_at is None:
            series.waiting.dec()
        else:
            series.ttft.observe(exchange.first_at - exchange.started)
        series.inflight.dec()
        series.duration.observe(now - exchange.started)
        series.request_ended(exchange.code)
        if exchange.malformed:
            self.metrics.malformed.labels(model).inc()
        usage = exchange.usage
        if usage is not None and exchange.facts is not None:
            usage = self.guard.check(
                model,
                exchange.facts,
                usage,
                exchange.seen_bytes,
                time.monotonic() - exchange.started,
                metered.prompt_estimate,
                lambda: self._own_generation(exchange),
            )
        if usage is not None:
            meter.finish(metered, usage.prompt, usage.generation, complete=not exchange.failed)
            prompt, generation = usage.prompt, usage.generation
            if not exchange.failed:
                self.abandoned.observe(exchange.name, generation, now - exchange.started)
        elif exchange.code == CLIENT_GONE and exchange.reserved is not None:
            prompt = metered.prompt_estimate
            seconds = now - exchange.started
            generation, method = self.abandoned.generation(exchange.name, seconds, exchange.reserved)
            meter.finish(metered, prompt, generation, complete=False)
            self.metrics.estimated_tokens.labels("prompt", model, tenant, self.counter.name).inc(prompt)
            self.metrics.estimated_tokens.labels("generation", model, tenant, method).inc(generation)
        elif exchange.failed:
            meter.abort(metered)
            prompt, generation = metered.sp, metered.sg
        else:
            prompt = metered.prompt_estimate
            # A whole answer is text at hand; a stream's text is kept only for a tokenizer,
            # else each piece streamed counts as one token.
            by_text = self._keep_texts or not exchange.streamed
            generation = self._own_generation(exchange)
            meter.finish(metered, prompt, generation)
            method = self.counter.name if by_text else "pieces"
            self.metrics.estimated_tokens.labels("prompt", model, tenant, self.counter.name).inc(prompt)
            self.metrics.estimated_tokens.labels("generation", model, tenant, method).inc(generation)
        series.prompt_tokens.inc(prompt)
        series.generation_tokens.inc(generation)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "request model=%s tenant=%s code=%s prompt=%d generation=%d ttft=%s duration=%.3f usage=%s",
                model,
                tenant,
                exchange.code,
                prompt,
                generation,
                "-" if exchange.first_at is None else f"{exchange.first_at - exchange.started:.3f}",
                now - exchange.started,
                "reported" if usage is not None else "estimated",
            )
        return prompt, generation
