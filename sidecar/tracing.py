"""The spans of a counted request (token_scaler/tracing.py says when tracing is on).

Two spans per counted request, the usual shape of a proxy:

- a SERVER span, ``POST <path>``, for the request as the sidecar received it: a child of the
  client's ``traceparent`` when it sent one. It carries the tenant, the model asked for, the
  policies' actions (``tokenscaler.policy.actions``: ``cap``, ``downgrade``, ``stream_limit``,
  ``cut``, ``refuse``, ``rate_limit``; the details in ``tokenscaler.policy.*``), the status
  code, and the tokens as metered (``tokenscaler.usage.*``). A refused request has this span
  only, its status an error naming the refusal;
- a CLIENT span, ``<operation> <model>``, for the call to the model server: the GenAI
  inference span (``gen_ai.*`` attributes, the usage included, time to first token as
  ``gen_ai.response.time_to_first_chunk`` and a ``gen_ai.first_chunk`` event). Its context
  goes to the model server in ``traceparent``.

Both end when the answer has passed (a stream: when it ends), after the request settled, with
the counts the meter took. A client that leaves before the end leaves them with what was
counted by then, ``tokenscaler.client_gone = true`` and status code 499. The GenAI usage is on
the CLIENT span only, so a backend that sums ``gen_ai.usage.*`` over spans counts it once.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from opentelemetry.trace import Span, SpanKind, Status, StatusCode, set_span_in_context

from sidecar.openai import Kind, ParsedRequest
from sidecar.responses import CLIENT_GONE
from token_scaler.tracing import Tracing

if TYPE_CHECKING:
    from aiohttp import web
    from multidict import CIMultiDict

    from sidecar.exchange import Exchange
    from sidecar.policy.admission import Admission

# gen_ai.operation.name of each endpoint (GenAI semantic conventions' well-known values).
OPERATIONS = {
    Kind.CHAT: "chat",
    Kind.COMPLETIONS: "text_completion",
    Kind.EMBEDDINGS: "embeddings",
    Kind.RESPONSES: "chat",
    Kind.MESSAGES: "chat",
}
# The API the sidecar speaks to the model server (gen_ai.provider.name; gen_ai.system, its
# older name, is still what many backends read): Anthropic's for its Messages API.
PROVIDER = "openai"
PROVIDERS = {Kind.MESSAGES: "anthropic"}
_CAP_HEADER, _ROUTE_HEADER = "x-tokenscaler-max-tokens", "x-tokenscaler-model"


def address(url: str) -> tuple[str, int]:
    """server.address and server.port of an upstream URL."""
    parts = urlsplit(url)
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


class SidecarTracing:
    """Starts a ``RequestTrace`` for each counted request."""

    def __init__(self, tracing: Tracing, upstream: str) -> None:
        self.tracing = tracing
        self.tracer = tracing.tracer
        self.upstream = address(upstream)

    def start(self, request: web.Request, parsed: ParsedRequest, tenant_header: str) -> RequestTrace:
        tenant = request.headers.get(tenant_header) or "none"
        span = self.tracer.start_span(
            f"POST {request.path}",
            context=self.tracing.extract(request.headers),
            kind=SpanKind.SERVER,
            attributes={
                "http.request.method": "POST",
                "url.path": request.path,
                "tokenscaler.tenant": tenant,
                "tokenscaler.model": parsed.model or "unknown",
                "tokenscaler.stream": parsed.stream,
            },
        )
        return RequestTrace(self, span, parsed, tenant)


class RequestTrace:
    """The spans of one counted request."""

    __slots__ = (
        "_client",
        "_max_tokens",
        "_parsed",
        "_server",
        "_started",
        "_started_ns",
        "_tenant",
        "_tracing",
        "actions",
    )

    def __init__(self, tracing: SidecarTracing, span: Span, parsed: ParsedRequest, tenant: str) -> None:
        self._tracing = tracing
        self._server = span
        self._parsed = parsed
        self._client: Span | None = None
        self._tenant = tenant
        self._max_tokens = parsed.max_tokens  # as sent upstream
        self._started = 0.0
        self._started_ns = 0
        self.actions: list[str] = []

    def admitted(self, admission: Admission) -> None:
        """What the policies did to the request; a refused one's span ends here."""
        span = self._server
        self._tenant = admission.tenant
        self._max_tokens = admission.max_tokens
        span.set_attribute("tokenscaler.tenant", admission.tenant)
        rejection = admission.rejection
        if rejection is not None:
            self.actions.append("rate_limit" if rejection.reason == "rate_limit" else "refuse")
            span.set_attribute("tokenscaler.policy.refusal", rejection.reason or rejection.code)
            span.set_attribute("tokenscaler.policy.actions", self.actions)
            span.set_attribute("http.response.status_code", rejection.status)
            span.set_attribute("error.type", rejection.code)
            span.set_status(Status(StatusCode.ERROR, rejection.message))
            span.end()
            return
        cap, route = admission.headers.get(_CAP_HEADER), admission.headers.get(_ROUTE_HEADER)
        if cap is not None:
            self.actions.append("cap")
            span.set_attribute("tokenscaler.policy.cap", cap)
        if route is not None:
            self.actions.append("downgrade")
            span.set_attribute("tokenscaler.policy.downgrade", route)
        if admission.stream_limit is not None:
            self.actions.append("stream_limit")
            span.set_attribute("tokenscaler.policy.stream_limit", admission.stream_limit)

    def abandoned(self) -> None:
        """The client left (or the handler failed) before the request reached the model server:
        the server span ends with what it has, marked so."""
        span = self._server
        span.set_attribute("tokenscaler.client_gone", True)
        span.set_attribute("http.response.status_code", 499)
        if self.actions:
            span.set_attribute("tokenscaler.policy.actions", self.actions)
        span.end()

    def forward(self, headers: CIMultiDict[str], exchange: Exchange) -> None:
        """Start the call to the model server and put its context in the request's headers.
        A request the sampler left out passes its server span's context on instead: nothing
        of it is recorded, and a second span would only cost time."""
        tracing = self._tracing
        if not self._server.is_recording():
            tracing.tracing.inject(headers, set_span_in_context(self._server))
            return
        parsed = self._parsed
        operation = OPERATIONS.get(parsed.kind, parsed.kind.value)
        model = exchange.name
        host, port = tracing.upstream if exchange.upstream is None else address(exchange.upstream)
        attributes: dict[str, str | int | bool] = {
            "gen_ai.operation.name": operation,
            "gen_ai.provider.name": PROVIDERS.get(parsed.kind, PROVIDER),
            "gen_ai.system": PROVIDERS.get(parsed.kind, PROVIDER),
            "gen_ai.request.model": model,
            "server.address": host,
            "server.port": port,
            "tokenscaler.tenant": self._tenant,
        }
        if self._max_tokens is not None:
            attributes["gen_ai.request.max_tokens"] = self._max_tokens
        if parsed.n != 1:
            attributes["gen_ai.request.choice.count"] = parsed.n
        self._started = time.monotonic()
        self._started_ns = time.time_ns()
        self._client = span = tracing.tracer.start_span(
            f"{operation} {model}",
            context=set_span_in_context(self._server),
            kind=SpanKind.CLIENT,
            attributes=attributes,
            start_time=self._started_ns,
        )
        tracing.tracing.inject(headers, set_span_in_context(span))

    def end(self, exchange: Exchange, prompt: int, generation: int) -> None:
        """The request settled at ``prompt`` and ``generation`` tokens: end both spans."""
        if not self._server.is_recording():
            return
        code = int(exchange.code) if exchange.code.isdigit() else 0
        gone = exchange.code == CLIENT_GONE
        if exchange.cut:
            self.actions.append("cut")
        client = self._client
        if client is not None:
            client.set_attribute("gen_ai.usage.input_tokens", prompt)
            client.set_attribute("gen_ai.usage.output_tokens", generation)
            if exchange.response_model is not None:
                client.set_attribute("gen_ai.response.model", exchange.response_model)
            if exchange.first_at is not None:  # from the call's start
                seconds = max(0.0, exchange.first_at - self._started)
                client.set_attribute("gen_ai.response.time_to_first_chunk", seconds)
                client.add_event("gen_ai.first_chunk", timestamp=self._started_ns + int(seconds * 1e9))
            if code:
                client.set_attribute("http.response.status_code", code)
            if gone:
                client.set_attribute("tokenscaler.client_gone", True)
            elif exchange.failed:
                client.set_attribute("error.type", exchange.code)
                client.set_status(Status(StatusCode.ERROR, f"the model server's answer failed ({code})"))
            client.end()
        server = self._server
        server.set_attribute("tokenscaler.usage.input_tokens", prompt)
        server.set_attribute("tokenscaler.usage.output_tokens", generation)
        source = "reported" if exchange.usage is not None else "counted"
        server.set_attribute("tokenscaler.usage.source", source)
        if code:
            server.set_attribute("http.response.status_code", code)
        if self.actions:
            server.set_attribute("tokenscaler.policy.actions", self.actions)
        if gone:
            server.set_attribute("tokenscaler.client_gone", True)
        elif exchange.failed and code >= 500:
            server.set_attribute("error.type", exchange.code)
            server.set_status(Status(StatusCode.ERROR, f"answered {code}"))
        server.end()
