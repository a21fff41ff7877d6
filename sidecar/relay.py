"""The model server's answer to a counted request, on its way back to the client.

A whole answer is read, counted and sent on as the same bytes (``complete``); a stream (SSE)
passes event by event as each completes, counted as it passes (``stream``). Either carries
the policies' response headers. A stream past its budget reservation is ended cleanly with a
stop event; an upstream that breaks off mid-stream breaks off the client's stream too.
"""

from __future__ import annotations

import aiohttp
from aiohttp import web

from sidecar import wires
from sidecar.accounting import Accounting
from sidecar.exchange import Exchange
from sidecar.meter import Request
from sidecar.policy.admission import Admission
from sidecar.responses import CLIENT_GONE, RESPONSE_DROP, Errors, abort_client, forward_headers
from sidecar.sse import SSEParser


class Relay:
    def __init__(self, accounting: Accounting, errors: Errors) -> None:
        self.accounting = accounting
        self.errors = errors

    async def complete(self, upstream: aiohttp.ClientResponse, exchange: Exchange) -> web.StreamResponse:
        try:
            body = await upstream.read()
        except (TimeoutError, aiohttp.ClientError) as exc:
            exchange.failed = True
            response = self.errors.of(exchange.kind).upstream(exc)
            exchange.code = str(response.status)
            return response
        self.accounting.answer(exchange, body)
        response = web.Response(
            status=upstream.status,
            reason=upstream.reason,
            headers=forward_headers(upstream.headers, drop=RESPONSE_DROP),
            body=body,
        )
        if exchange.headers:
            response.headers.update(exchange.headers)
        return response

    async def stream(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        metered: Request,
        exchange: Exchange,
        admission: Admission | None,
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            status=upstream.status,
            reason=upstream.reason,
            headers=forward_headers(upstream.headers, drop=RESPONSE_DROP),
        )
        if exchange.headers:
            response.headers.update(exchange.headers)
        await response.prepare(request)
        exchange.streamed = True
        parser = SSEParser()
        event = self.accounting.event
        try:
            async for data in upstream.content.iter_any():
                out = [event(one, metered, exchange) for one in parser.feed(data)]
                if exchange.cut and admission is not None:
                    # Past its reservation: end the client's stream cleanly, and the upstream's.
                    out.append(
                        wires.of(exchange.kind).stop_event(
                            exchange.kind,
                            admission.stream_mode,
                            "token budget exhausted: the stream reached its budget reservation",
                            exchange.pieces,
                        )
                    )
                    await response.write(b"".join(out))
                    await response.write_eof()
                    return response
                if out:
                    await response.write(b"".join(out))
            tail = parser.close()
            if tail is not None:
                await response.write(event(tail, metered, exchange))
        except (TimeoutError, aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError):
            # The upstream broke off mid-stream: so does the client's stream.
            exchange.code = "502"
            exchange.failed = True
            abort_client(request)
            return response
        except ConnectionResetError:
            exchange.code = CLIENT_GONE
            exchange.failed = True
            return response
        await response.write_eof()
        return response
