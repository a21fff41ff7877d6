"""What one counted request has seen so far: filled in by the proxy, the relay and the accounting."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from multidict import CIMultiDict

from sidecar.metrics import Series
from sidecar.openai import Kind, Usage
from sidecar.usage_bounds import RequestFacts


class Trace(Protocol):
    """The spans of one request (``sidecar/tracing.py``), as the proxy drives them."""

    def forward(self, headers: CIMultiDict[str], exchange: Exchange) -> None: ...

    def end(self, exchange: Exchange, prompt: int, generation: int) -> None: ...


@dataclass(slots=True)
class Exchange:
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
    cached: tuple[int, int] = (0, 0)  # settled prompt tokens read from / written to a prompt cache
    reserved: int | None = None  # generated tokens charged if a non-streamed client leaves (abandon.py)
    response_model: str | None = None  # the model the answer names (with its usage, in a stream)
    trace: Trace | None = None  # its spans, when tracing is on (tracing.py)
