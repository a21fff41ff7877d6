"""The reverse proxy: forwards everything, counts the OpenAI and Anthropic endpoints it understands.

Three paths:
- passthrough: any other method or path, streamed both ways, uncounted;
- counted, non-streamed: the response is read whole, its ``usage`` counted, the same
  bytes sent on;
- counted, streamed (SSE): events pass as they complete, counted as they pass, and the
  final ``usage`` settles the request. When the client did not ask for usage the sidecar
  asks the upstream for it and removes it again, so the client's bytes are unchanged.

The proxy only orders the work of its collaborators, each the owner of its own state:

- ``intake`` routes the normalised path and reads and checks a counted request's body
  within its limits (paths.py, request_rules.py), large bodies off the event loop;
- the policies, when configured, admit the request or refuse it (policy/engine.py);
- ``upstream`` holds the session to the model server, sends the request (once more on a
  dead kept-alive connection) and passes through what is not counted;
- ``relay`` sends the answer back, whole or event by event;
- ``accounting`` meters the request on arrival, counts its answer as it passes and settles
  it at the end; the policies then settle it too;
- ``errors`` are the answers the sidecar gives itself (responses.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from sidecar.accounting import Accounting
from sidecar.exchange import Exchange
from sidecar.intake import Intake, OffLoop
from sidecar.labels import OTHER, ModelLabels
from sidecar.meter import LabelBound, Meter, Request
from sidecar.metrics import Metrics
from sidecar.openai import ParsedRequest
from sidecar.policy.engine import Admission, PolicyEngine
from sidecar.relay import Relay
from sidecar.responses import CLIENT_GONE, REQUEST_DROP, Errors, forward_headers
from sidecar.tokens import TokenCounter, prompt_tokens
from sidecar.upstream import Upstream

if TYPE_CHECKING:
    from sidecar.tracing import SidecarTracing


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
        upstream_ca: Path | None = None,
    ) -> None:
        self.policy = policy
        self.tracing: SidecarTracing | None = None  # spans, when tracing is on (tracing.py)
        self.tenant_header = tenant_header
        self.tenants = LabelBound(max_tenants)
        self.models = ModelLabels(max_models, models)
        self.errors = errors = Errors(metrics.rejected)
        self.off_loop = off_loop = OffLoop()
        self.intake = Intake(errors, off_loop, max_body_bytes=max_body_bytes, body_timeout_s=body_timeout_s)
        self.upstream = Upstream(
            upstream,
            errors,
            metrics.upstream_retries,
            connect_timeout_s=connect_timeout_s,
            read_timeout_s=read_timeout_s,
            ca_file=upstream_ca,
        )
        self.accounting = Accounting(meter, metrics, counter, self.tenants, self.models)
        self.relay = Relay(self.accounting, errors)

    async def start(self) -> None:
        await self.upstream.start()

    async def close(self) -> None:
        await self.upstream.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        return self.upstream.session

    async def handle(self, request: web.Request) -> web.StreamResponse:
        read = await self.intake.read(request)
        if read is None:
            return await self.upstream.passthrough(request)
        if isinstance(read, web.StreamResponse):
            return read
        parsed, body = read
        return await self._counted(request, parsed, body)

    async def _counted(self, request: web.Request, parsed: ParsedRequest, body: bytes) -> web.StreamResponse:
        trace = None if self.tracing is None else self.tracing.start(request, parsed, self.tenant_header)
        try:
            prompt = await self.off_loop(len(body), prompt_tokens, self.accounting.counter, parsed)
            admission = None
            if self.policy is not None:
                admission = await self.policy.admit(request.headers, parsed, body, prompt)
        except BaseException:  # the client left while the prompt was counted or admitted
            if trace is not None:
                trace.abandoned()
            raise
        sent = body
        max_tokens = parsed.max_tokens
        if admission is None:
            name = parsed.model or "unknown"
            tenant = request.headers.get(self.tenant_header) or "none"
        else:
            if trace is not None:
                trace.admitted(admission)
            if admission.rejection is not None:
                return self.errors.of(parsed.kind).refused(admission.rejection)
            body, max_tokens = admission.body, admission.max_tokens
            name = admission.model or "unknown"
            tenant = admission.tenant
        body, inject = await self.intake.usage_asked(parsed, body, body is not sent)
        metered, exchange = self.accounting.arrive(
            parsed, body, prompt, max_tokens, name, tenant, inject, admission
        )
        exchange.trace = trace
        try:
            return await self._exchange(request, body, metered, exchange, admission)
        except asyncio.CancelledError:
            # The client went away (aiohttp cancels the handler) or the drain timed out.
            exchange.code = CLIENT_GONE
            exchange.failed = True
            raise
        finally:
            prompt, generation = self.accounting.settle(metered, exchange)
            if trace is not None:
                trace.end(exchange, prompt, generation)
            if admission is not None and self.policy is not None:
                if exchange.cut:
                    self.policy.metrics.stream_cuts.labels(metered.tenant).inc()
                self.policy.settle(admission, prompt, generation, exchange.cached)

    async def _exchange(
        self,
        request: web.Request,
        body: bytes,
        metered: Request,
        exchange: Exchange,
        admission: Admission | None,
    ) -> web.StreamResponse:
        url = self.upstream.url(request, exchange.upstream)
        try:
            # Counting needs the body readable: no compression on counted endpoints.
            headers = forward_headers(request.headers, drop=REQUEST_DROP | {"accept-encoding"})
            if exchange.trace is not None:
                exchange.trace.forward(headers, exchange)
            upstream = await self.upstream.send("POST", url, headers, body)
        except (TimeoutError, aiohttp.ClientError) as exc:
            response = self.errors.of(exchange.kind).upstream(exc)
            exchange.code = str(response.status)
            exchange.failed = True
            return response
        async with upstream:
            exchange.code = str(upstream.status)
            exchange.failed = upstream.status >= 400
            if not exchange.failed and metered.model == OTHER:
                self.accounting.labelled(metered, exchange)
            if upstream.headers.get("Content-Type", "").startswith("text/event-stream"):
                return await self.relay.stream(request, upstream, metered, exchange, admission)
            return await self.relay.complete(upstream, exchange)
