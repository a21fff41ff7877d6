"""What the sidecar passes on of each side's headers, and the answers it gives itself.

Hop-by-hop headers (RFC 9110 7.6.1) and the ones the ``Connection`` header names are never
forwarded (``forward_headers``). The errors the sidecar answers on its own (a body too large
or too slow, a request it cannot count, a policy's refusal, a model server that did not
answer) are JSON in the shape of the request's wire format (OpenAI's, or Anthropic's on
``/v1/messages``: ``Errors.of``), each counted in ``tokenscaler_rejected_requests{code}``
(``Errors``).
"""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from prometheus_client import Counter

from sidecar import wires
from sidecar.openai import Kind
from sidecar.policy.refusals import Rejection
from sidecar.request_rules import Refusal

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
REQUEST_DROP = frozenset({"host", "content-length"})
STREAM_REQUEST_DROP = frozenset({"host"})
RESPONSE_DROP = frozenset({"content-length"})
CLIENT_GONE = "499"  # nginx's code for a client that closed the connection first


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


def abort_client(request: web.Request) -> None:
    """End the client's connection without a proper end of body, as a broken upstream would.

    What was written is flushed first; aiohttp's own ``write_eof`` then meets a closing
    transport, which it takes as a client that went away.
    """
    if request.transport is not None:
        request.transport.close()


class Errors:
    """The answers the sidecar gives itself in one wire format, each counted by its status code."""

    def __init__(self, rejected: Counter, wire: wires.Wire = wires.OPENAI) -> None:
        self._rejected = rejected
        self._wire = wire
        self._siblings: dict[str, Errors] = {wire.name: self}

    def of(self, kind: Kind | None) -> Errors:
        """The errors of ``kind``'s wire format (the same counter)."""
        wire = wires.of(kind)
        found = self._siblings.get(wire.name)
        if found is None:
            found = self._siblings[wire.name] = Errors(self._rejected, wire)
            found._siblings = self._siblings
        return found

    def _count(self, status: int) -> None:
        self._rejected.labels(str(status)).inc()

    def _response(self, status: int, message: str, type_: str, code: str) -> web.Response:
        body = self._wire.error_body(status, message, type_, code, None)
        return web.Response(status=status, body=body, content_type="application/json")

    def bad_request(self, refusal: Refusal) -> web.Response:
        self._count(400)
        body = self._wire.error_body(
            400, refusal.message, "invalid_request_error", refusal.code, refusal.param
        )
        return web.Response(status=400, body=body, content_type="application/json")

    def too_large(self, limit: int) -> web.Response:
        self._count(413)
        return self._response(
            413,
            f"request body larger than the sidecar's limit of {limit} bytes",
            "invalid_request_error",
            "request_too_large",
        )

    def body_timeout(self, seconds: float) -> web.Response:
        self._count(408)
        message = f"the request body did not arrive within {seconds:g} s"
        return self._response(408, message, "invalid_request_error", "request_timeout")

    def refused(self, rejection: Rejection) -> web.Response:
        self._count(rejection.status)
        response = self._response(rejection.status, rejection.message, rejection.type, rejection.code)
        response.headers.update(rejection.headers)
        return response

    def upstream(self, exc: BaseException) -> web.Response:
        if isinstance(exc, asyncio.TimeoutError):
            status, message, code = 504, "the model server did not answer in time", "upstream_timeout"
        elif isinstance(exc, aiohttp.ClientConnectorCertificateError):
            message = "the upstream's TLS certificate is not trusted (see --upstream-ca)"
            status, code = 502, "upstream_certificate"
        elif isinstance(exc, aiohttp.ClientConnectorError):
            status, message, code = 503, "the model server is not reachable", "upstream_unavailable"
        else:
            status, message, code = 502, f"bad answer from the model server: {exc}", "upstream_error"
        self._count(status)
        return self._response(status, message, "server_error", code)
