"""Settings the sweep varies: the token policy's panic, written ``6:2``, ``6:2:120`` or ``off``,
and its burst envelope, written ``10:0.9:1200`` (window, quantile, lookback) or ``off``."""

from __future__ import annotations

from scaler.metadata import BURST_LOOKBACK_MAX_S, BURST_WINDOW_MAX_S

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


def parse_burst(raw: str) -> tuple[int, float, int] | None:
    """``10:0.9:1200`` (burst window 10 s, quantile 0.9, lookback 1200 s), ``10:0.9`` (the
    default lookback) or ``off`` (None)."""
    if raw.strip().lower() == "off":
        return None
    parts = raw.split(":")
    if len(parts) not in (2, 3):
        raise ValueError(f"expected WINDOW:QUANTILE[:LOOKBACK] or off, got {raw!r}")
    lookback = int(parts[2]) if len(parts) == 3 else BURST_LOOKBACK_MAX_S
    window, quantile = int(parts[0]), float(parts[1])
    if (
        not 1 <= window <= BURST_WINDOW_MAX_S
        or not 0 < quantile <= 1
        or not 60 <= lookback <= BURST_LOOKBACK_MAX_S
    ):
        raise ValueError(
            f"{raw!r}: window 1-{BURST_WINDOW_MAX_S} s, quantile in (0, 1], "
            f"lookback 60-{BURST_LOOKBACK_MAX_S} s"
        )
    return window, quantile, lookback


def burst_variant(burst: tuple[int, float, int] | None) -> str:
    """The sweep's label of a burst envelope setting, read back by ``registry.token_metadata``."""
    if burst is None:
        return "off"
    window, quantile, lookback = burst
    return f"{window}@{quantile:g}/{lookback}"


def burst_metadata(label: str) -> dict[str, str]:
    """The trigger metadata of a ``burst_variant`` label."""
    if label == "off":
        return {"burstWindowSeconds": "0"}
    window, _, rest = label.partition("@")
    quantile, _, lookback = rest.partition("/")
    return {"burstWindowSeconds": window, "burstQuantile": quantile, "burstLookbackSeconds": lookback}
