"""Settings the sweep varies: the token policy's panic, written ``6:2`` or ``off``."""

from __future__ import annotations

PANIC_OFF = 1e9  # a panicThreshold no burst reaches


def parse_panic(raw: str) -> tuple[int, float]:
    """``6:2`` (panic window 6 s, threshold 2x) or ``off``."""
    if raw.strip().lower() == "off":
        return 6, PANIC_OFF
    window, sep, threshold = raw.partition(":")
    if not sep:
        raise ValueError(f"expected WINDOW:THRESHOLD or off, got {raw!r}")
    return int(window), float(threshold)
