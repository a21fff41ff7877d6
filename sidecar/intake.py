"""A request's way in: its path routed, a counted request's body read within limits and checked.

The path is normalised before it is routed on and forwarded in that form (paths.py); a path
the sidecar does not count is left to the passthrough. A counted request's body must arrive
within ``body_timeout_s`` (408) and ``max_body_bytes`` (413), and a body two parsers could
read differently is refused with 400 (request_rules.py), so the model server generates by the
values the sidecar metered. Large bodies are worked on off the event loop (``OffLoop``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, TypeVar

from aiohttp import web

from sidecar import openai, paths, request_rules
from sidecar.openai import ParsedRequest
from sidecar.request_rules import Refusal
from sidecar.responses import Errors
from sidecar.upstream import TARGET

_T = TypeVar("_T")
# Bodies this large are parsed in a worker thread (the loop serves meanwhile), one at a time.
LARGE_BODY_BYTES = 256 << 10


class OffLoop:
    """Work on a body: at once when it is small; a large one in a worker thread, one at a
    time, so the loop keeps serving meanwhile and parsing holds one large body's objects."""

    def __init__(self) -> None:
        self._large = asyncio.Semaphore(1)

    async def __call__(self, size: int, work: Callable[..., _T], *args: Any) -> _T:
        if size < LARGE_BODY_BYTES:
            return work(*args)
        async with self._large:
            return await asyncio.to_thread(work, *args)


class Intake:
    def __init__(
        self, errors: Errors, off_loop: OffLoop, *, max_body_bytes: int, body_timeout_s: float
    ) -> None:
        self.errors = errors
        self.off_loop = off_loop
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s

    async def read(self, request: web.Request) -> tuple[ParsedRequest, bytes] | web.Response | None:
        """A counted request, parsed, and its body; an answer when it is refused; None for a
        request the sidecar does not count (to pass through)."""
        target = paths.route(request.method, request.raw_path)
        errors = self.errors.of(target.kind)
        if request.content_length is not None and request.content_length > self.max_body_bytes:
            return errors.too_large(self.max_body_bytes)
        if target.refusal is not None:
            return errors.bad_request(Refusal(None, target.refusal, "invalid_path"))
        request[TARGET] = target.forward
        if target.kind is None:
            return None
        try:
            async with asyncio.timeout(self.body_timeout_s):
                body = await self._body(request)
        except TimeoutError:
            return errors.body_timeout(self.body_timeout_s)
        if body is None:
            return errors.too_large(self.max_body_bytes)
        parsed = await self.off_loop(len(body), request_rules.check, target.kind, body)
        if isinstance(parsed, Refusal):
            return errors.bad_request(parsed)
        return parsed, body

    async def _body(self, request: web.Request) -> bytes | None:
        parts: list[bytes] = []
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            parts.append(chunk)
        return b"".join(parts)

    async def usage_asked(self, parsed: ParsedRequest, body: bytes, rewritten: bool) -> tuple[bytes, bool]:
        """The body to send, and whether the sidecar asked for usage: a stream of an endpoint
        that reports usage only when asked is asked to (the client's bytes stay unchanged:
        relay.py removes it again). ``rewritten``: a policy changed the body, so the parsed
        layout no longer applies."""
        if parsed.stream and parsed.kind in openai.USAGE_OPT_IN and not parsed.wants_usage:
            layout = None if rewritten else parsed.layout
            size = 0 if layout is not None else len(body)
            asked = await self.off_loop(size, openai.with_usage_requested, body, layout)
            if asked is not None:
                return asked, True
        return body, False
