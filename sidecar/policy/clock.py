"""The clocks the policies read, injected so that tests can move them."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Clock:
    # Seconds since the epoch: budget periods (with Redis' offset), the saturation key's age.
    wall: Callable[[], float] = time.time
    # Seconds, never set back: chunks' windows and ages, lease renewals, announcements.
    monotonic: Callable[[], float] = time.monotonic
