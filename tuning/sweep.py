"""Settings the sweep varies: the token policy's panic, written ``6:2``, ``6:2:120`` or ``off``."""

from __future__ import annotations

PANIC_OFF = 1e9  # a panicThreshold no burst reaches


def parse_panic(raw: str) -> tuple[int, float, int | None]:
    """``6:2`` (panic window 6 s, threshold 2x), ``6:2:120`` (and hold 120 s) or ``off``."""
    if raw.strip().lower() == "off":
        return 6, PANIC_OFF, None
    parts = raw.split(":")
    if len(parts) not in (2, 3):
        raise ValueError(f"expected WINDOW:THRESHOLD[:HOLD] or off, got {raw!r}")
    hold = int(parts[2]) if len(parts) == 3 else None
    return int(parts[0]), float(parts[1]), hold


def panic_variant(window: int, threshold: float, hold: int | None) -> str:
    """The sweep's label of a panic setting, read back by ``registry.token_metadata``."""
    if threshold >= PANIC_OFF:
        return "off"
    return f"{window}@{threshold:g}" + (f"/{hold}" if hold is not None else "")
