"""What the sidecar passes on of each side's headers, and the answers it gives itself.

Hop-by-hop headers (RFC 9110 7.6.1) and the ones the ``Connection`` header names are never
forwarded (``forward_headers``). The errors the sidecar answers on its own (a body too large
or too slow, a request it cannot count, a policy's refusal, a model server that did not
answer) are OpenAI-shaped JSON, each counted in ``tokenscaler_rejected_requests{code}``
(``Errors``).
"""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from prometheus_client import Counter

from sidecar import openai
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


def error_response(status: int, message: str, type_: str, code: str) -> web.Response:
    return web.Response(
        status=status,
        body=openai.error_body(message, type_, code),
        content_type="application/json",
    )


def abort_client(request: web.Request) -> None:
    """End the client's connection without a proper end of body, as a broken upstream would.

    What was written is flushed first; aiohttp's own ``write_eof`` then meets a closing
    transport, which it takes as a client that went away.
    """
    if request.transport is not None:
        request.transport.close()


class Errors:
    """The answers the sidecar gives itself, each counted by its status code."""

    def __init__(self, rejected: Counter) -> None:
        self._rejected = rejected

    def _count(self, status: int) -> None:
        self._rejected.labels(str(status)).inc()

    def bad_request(self, refusal: Refusal) -> web.Response:
        self._count(400)
        return web.Response(status=400, body=refusal.body(), content_type="application/json")

    def too_large(self, limit: int) -> web.Response:
        self._count(413)
        return error_response(
            413,
            f"request body larger than the sidecar's limit of {limit} bytes",
            "invalid_request_error",
            "request_too_large",
        )

    def body_timeout(self, seconds: float) -> web.Response:
        self._count(408)
        message = f"the request body did not arrive within {seconds:g} s"
        return error_response(408, message, "invalid_request_error", "request_timeout")

    def refused(self, rejection: Rejection) -> web.Response:
        self._count(rejection.status)
        response = error_response(rejection.status, rejection.message, rejection.type, rejection.code)
        response.headers.update(rejection.headers)
        return response

    def upstream(self, exc: BaseException) -> web.Response:
        if isinstance(exc, asyncio.TimeoutError):
            status, message, code = 504, "the model server did not answer in time", "upstream_timeout"
        elif isinstance(exc, aiohttp.ClientConnectorError):
            status, message, code = 503, "the model server is not reachable", "upstream_unavailable"
        else:
            status, message, code = 502, f"bad answer from the model server: {exc}", "upstream_error"
        self._count(status)
        return error_response(status, message, "server_error", code)
