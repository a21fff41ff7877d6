"""Token-weighted rate limits: GCRA parameters and OpenAI-style headers (pure).

GCRA (the generic cell rate algorithm) keeps one number per limit, the theoretical arrival
time (TAT). A request of ``c`` tokens at rate ``r`` tokens/min moves the TAT on by
``c x 60000 / r`` ms and is admitted while the TAT stays within the burst (``burstSeconds``,
a minute by default: a full minute's tokens at once) of now. The sums live in Redis,
updated by one Lua script, so every sidecar shares one limit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Limit:
    tokens_per_minute: int
    interval_ms: float  # per token
    tau_ms: float  # burst tolerance

    @classmethod
    def of(cls, tokens_per_minute: int, burst_seconds: float, factor: float = 1.0) -> Limit:
        rate = max(1e-9, tokens_per_minute * factor)
        return cls(max(1, int(rate)), 60_000.0 / rate, burst_seconds * 1000.0)


def duration(ms: float) -> str:
    """OpenAI's reset format: ``20ms``, ``1.5s``, ``6m0s``."""
    if ms < 1000:
        return f"{max(0, math.ceil(ms))}ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.3g}s"
    minutes, rest = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{rest}s"


def headers(limit: Limit, remaining: int, reset_ms: float) -> dict[str, str]:
    return {
        "x-ratelimit-limit-tokens": str(limit.tokens_per_minute),
        "x-ratelimit-remaining-tokens": str(max(0, remaining)),
        "x-ratelimit-reset-tokens": duration(reset_ms),
    }


def retry_headers(retry_after_ms: float) -> dict[str, str]:
    return {
        "Retry-After": str(max(1, math.ceil(retry_after_ms / 1000))),
        "retry-after-ms": str(max(1, math.ceil(retry_after_ms))),
    }
