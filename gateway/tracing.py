"""The spans of a request the gateway holds and routes (token_scaler/tracing.py says when).

For each request to an endpoint the sidecar counts:

- a SERVER span, ``POST <path>``, from the request's arrival to its answer's end, a child of
  the client's ``traceparent`` when it sent one: the model and workload
  (``tokenscaler.model``, ``tokenscaler.workload``), the tokens it was weighed at
  (``tokenscaler.weight``), whether it was held and for how long (``tokenscaler.held``,
  ``tokenscaler.hold_seconds``, summed over its attempts), its attempts, its status code; a
  refusal (unknown model, full queue, queue timeout, no replica answering) is its error;
- a CLIENT span per attempt at a replica, ``POST <path>``, with the replica's
  ``server.address`` / ``server.port`` and how the attempt ended. Its context replaces the
  request's ``traceparent`` / ``tracestate`` on the way to the replica, so the sidecar's
  spans are its children and the trace runs gateway -> sidecar -> model server.
"""

from __future__ import annotations

import dataclasses
import time

from opentelemetry.trace import Span, SpanKind, Status, StatusCode, set_span_in_context

from gateway.http1 import RequestHead
from sidecar.tracing import address
from token_scaler.tracing import TRACE_HEADERS, Tracing

_CRLF = b"\r\n"
_TRACE_NAMES = tuple(name.encode() for name in TRACE_HEADERS)


def trace_headers(forward: bytes) -> tuple[dict[str, str], bytes]:
    """The trace headers among a head's header lines, and the lines without them."""
    found: dict[str, str] = {}
    kept: list[bytes] = []
    for line in forward.split(_CRLF):
        if not line:
            continue
        name, _, value = line.partition(b":")
        lower = name.strip().lower()
        if lower in _TRACE_NAMES:
            found[lower.decode()] = value.strip().decode("latin-1")
        else:
            kept.append(line + _CRLF)
    return found, b"".join(kept)


class GatewayTracing:
    def __init__(self, tracing: Tracing) -> None:
        self.tracing = tracing
        self.tracer = tracing.tracer

    def start(self, head: RequestHead) -> RouteTrace:
        found, rest = trace_headers(head.forward)
        path = head.target.partition("?")[0]
        span = self.tracer.start_span(
            f"{head.method} {path}",
            context=self.tracing.extract(found),
            kind=SpanKind.SERVER,
            attributes={"http.request.method": head.method, "url.path": path},
        )
        return RouteTrace(self, span, rest, f"{head.method} {path}")


class RouteTrace:
    """The spans of one request through the gateway."""

    __slots__ = (
        "_attempt",
        "_held",
        "_hold_s",
        "_holding",
        "_name",
        "_refused",
        "_rest",
        "_tracing",
        "attempts",
        "server",
        "status",
    )

    def __init__(self, tracing: GatewayTracing, span: Span, rest: bytes, name: str) -> None:
        self._tracing = tracing
        self.server = span
        self._rest = rest  # the head's header lines without the trace headers
        self._name = name
        self._attempt: Span | None = None
        self._holding = 0.0
        self._hold_s = 0.0
        self._held = self._refused = False
        self.attempts = 0
        self.status = 0

    def weighed(self, model: str | None, workload: str, tokens: int) -> None:
        self.server.set_attribute("tokenscaler.model", model or "unknown")
        self.server.set_attribute("tokenscaler.workload", workload)
        self.server.set_attribute("tokenscaler.weight", tokens)

    def holding(self) -> None:
        """The request asks for a replica now."""
        self._holding = time.monotonic()

    def attempt(self, head: RequestHead, url: str, waited: bool) -> RequestHead:
        """A replica took the request: the head it gets, with this attempt's trace context."""
        self.attempts += 1
        if waited:
            self._held = True
            self._hold_s += time.monotonic() - self._holding
            self.server.add_event("routed", {"server.address": url})
        self._holding = 0.0
        span = self.server  # a request the sampler left out passes its server span's context on
        if span.is_recording():
            host, port = address(url)
            span = self._attempt = self._tracing.tracer.start_span(
                self._name,
                context=set_span_in_context(self.server),
                kind=SpanKind.CLIENT,
                attributes={
                    "server.address": host,
                    "server.port": port,
                    "tokenscaler.attempt": self.attempts,
                },
            )
        carrier: dict[str, str] = {}
        self._tracing.tracing.inject(carrier, set_span_in_context(span))
        lines = b"".join(f"{name}: {value}".encode("latin-1") + _CRLF for name, value in carrier.items())
        return dataclasses.replace(head, forward=self._rest + lines)

    def answered(self, status: int, outcome: str, detail: str | None = None) -> None:
        """How the attempt ended: ``outcome`` as gateway/upstream.py's ``Outcome``."""
        span = self._attempt
        if span is None:
            return
        self._attempt = None
        if status:
            span.set_attribute("http.response.status_code", status)
            self.status = status
        span.set_attribute("tokenscaler.outcome", outcome)
        if outcome != "done" or status >= 500:
            span.set_status(Status(StatusCode.ERROR, detail or outcome))
            if outcome == "broken":
                self.status = 502
        span.end()

    def _left_queue(self, held: bool) -> None:
        """The request leaves while it asks for a replica (refused, or its client left)."""
        if self._holding:
            self._held = self._held or held
            self._hold_s += time.monotonic() - self._holding
            self._holding = 0.0

    def refused(self, status: int, reason: str, message: str) -> None:
        self._left_queue(held=reason != "queue_full")
        self.status = status
        self._refused = True
        self.server.set_attribute("tokenscaler.refusal", reason)
        self.server.set_attribute("error.type", reason)
        self.server.set_status(Status(StatusCode.ERROR, message))

    def gone(self) -> None:
        """The client left before the answer ended."""
        self._left_queue(held=True)
        self.answered(0, "client_gone")
        self.status = 499
        self.server.set_attribute("tokenscaler.client_gone", True)

    def end(self) -> None:
        server = self.server
        server.set_attribute("tokenscaler.held", self._held)
        server.set_attribute("tokenscaler.hold_seconds", self._hold_s)
        server.set_attribute("tokenscaler.attempts", self.attempts)
        if self.status:
            server.set_attribute("http.response.status_code", self.status)
            if self.status >= 500 and not self._refused:
                server.set_status(Status(StatusCode.ERROR, f"answered {self.status}"))
        server.end()
