"""``--sweep``: the token policy over a grid of settings, and the Pareto front of
GPU-hours against SLO attainment."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

PANIC_OFF = 1e9  # a panicThreshold no burst reaches


@dataclass(frozen=True)
class Point:
    metadata: dict[str, str]
    scale_down_window_s: float
    gpu_hours: float
    attainment: float
    summary: dict[str, Any]


def panic_label(window: int, threshold: float) -> str:
    return "off" if threshold >= PANIC_OFF else f"{window}s@{threshold:g}x"


def parse_panic(raw: str) -> tuple[int, float]:
    """``6:2`` (panic window 6 s, threshold 2x) or ``off``."""
    if raw.strip().lower() == "off":
        return 6, PANIC_OFF
    window, sep, threshold = raw.partition(":")
    if not sep:
        raise ValueError(f"expected WINDOW:THRESHOLD or off, got {raw!r}")
    return int(window), float(threshold)


def grid(
    base: Mapping[str, str],
    windows: Sequence[int],
    headrooms: Sequence[float],
    panics: Sequence[tuple[int, float]],
    scale_down_windows: Sequence[float],
) -> list[tuple[dict[str, str], float]]:
    """Every combination as (ScaledObject metadata, scale-down stabilization seconds);
    panic windows longer than half the window are left out (the scaler refuses them)."""
    out = []
    for window, headroom, (pwin, pthr), down in itertools.product(
        windows, headrooms, panics, scale_down_windows
    ):
        if pwin > window // 2:
            continue
        metadata = dict(base)
        metadata.update(
            windowSeconds=str(window),
            headroom=f"{headroom:g}",
            panicWindowSeconds=str(pwin),
            panicThreshold=f"{pthr:g}",
        )
        out.append((metadata, down))
    return out


def pareto(points: Sequence[Point]) -> list[Point]:
    """Points no other point beats on both fewer GPU-hours and higher attainment, cheapest first."""
    ordered = sorted(points, key=lambda p: (p.gpu_hours, -p.attainment))
    front: list[Point] = []
    best = -1.0
    for point in ordered:
        if point.attainment > best:
            front.append(point)
            best = point.attainment
    return front


def recommend(front: Sequence[Point], goal: float) -> Point | None:
    """The cheapest point that meets ``goal`` attainment, else the one with the highest."""
    meeting = [p for p in front if p.attainment >= goal]
    if meeting:
        return min(meeting, key=lambda p: p.gpu_hours)
    return max(front, key=lambda p: p.attainment) if front else None
