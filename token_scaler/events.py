"""Waiting on asyncio events."""

from __future__ import annotations

import asyncio


async def first_of(*events: asyncio.Event, within: float) -> None:
    """Return when any of ``events`` is set, or after ``within`` seconds."""
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, timeout=within, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
