"""Token-weighted rate limits: GCRA parameters and OpenAI-style headers (pure).

GCRA (the generic cell rate algorithm) keeps one number per limit, the theoretical arrival
time (TAT). A request of ``c`` tokens at rate ``r`` tokens/min moves the TAT on by
``c x 60000 / r`` ms and is admitted while the TAT stays within the burst (``burstSeconds``,
a minute by default: a full minute's tokens at once) of now. The sums live in Redis,
updated by one Lua script, so every sidecar shares one limit.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Limit:
    tokens_per_minute: int
    interval_ms: float  # per token
    tau_ms: float  # burst tolerance

    @staticmethod
    @functools.lru_cache(maxsize=1024)  # a few per policy, asked for on every request
    def of(tokens_per_minute: int, burst_seconds: float, factor: float = 1.0) -> Limit:
        rate = max(1e-9, tokens_per_minute * factor)
        return Limit(max(1, int(rate)), 60_000.0 / rate, burst_seconds * 1000.0)


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


class LocalLimiter:
    """GCRA in this process, for while Redis is away (fail-open): the same limits, a share each.

    Every sidecar of the scope enforces ``1 / peers`` of each limit (its interval is
    ``peers`` times longer), so together they admit about the shared limit even though none
    of them sees the others. ``peers`` is how many sidecars of the scope announced
    themselves in Redis in the last minute before it went away.
    """

    MAX_KEYS = 10_000

    def __init__(self) -> None:
        self._tat: dict[str, float] = {}

    def admit(
        self, limits: list[tuple[str, Limit]], tokens: int, peers: int, now_ms: float
    ) -> tuple[int, float] | None:
        """Take ``tokens`` from every limit, or from none.

        None when admitted; else (index of the first limit that refuses, ms to wait).
        """
        new = []
        for i, (key, limit) in enumerate(limits):
            tat = max(self._tat.get(key, now_ms), now_ms)
            step = tokens * limit.interval_ms * peers
            wait = tat + step - max(limit.tau_ms, step) - now_ms
            if wait > 0:
                return i, wait
            new.append((key, tat + step))
        if len(self._tat) > self.MAX_KEYS:
            self._tat = {k: v for k, v in self._tat.items() if v > now_ms}
        self._tat.update(new)
        return None

    def correct(self, limits: list[tuple[str, Limit]], tokens: int, peers: int) -> None:
        """Move the limits by ``tokens`` (negative: a refund once the real usage is known)."""
        for key, limit in limits:
            if key in self._tat:
                self._tat[key] += tokens * limit.interval_ms * peers
