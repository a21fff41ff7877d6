"""Demand as arriving requests times their size (``sizeWindowSeconds``).

A token rate over a short window moves with how many requests arrive and with how large
the few in the window happen to be; a request rate over the same window moves with the
first only. On traffic whose request sizes vary a lot from one request to the next and
little from one hour to the next, the short window's token rate is the noisier signal,
and the HPA's scale-down stabilization keeps the highest of its noisy answers.

With ``sizeWindowSeconds`` L > 0 the stable window's demand is::

    arriving requests / covered seconds  x  size
    size = weighted tokens served / requests arrived, over the L s of the minute history
           that end a minute before the current one

The count comes from the window (the records' ``ar``), so it follows the traffic as fast
as the token rate does; the size comes from the per-minute history every scaler replica
keeps in Redis (``scaler/history.py``), so it survives restarts and replicas agree. The
span ends a minute back because the history holds a minute only once it has settled, some
seconds after its end: every replica, and the simulator, reads the same whole minutes.
The size follows slow changes in the mix (a prompt-heavy service in business hours) over
L; a change faster than L shows late, which is why it is an option (``token-scaler
simulate --sweep-size-windows`` measures it on a trace) and not the default.

Trust: the sized demand stays within ``SIZED_RANGE`` times the window's token rate (the
higher of served and arrived) either way, so a writer that misreports its arrivals (``ar``
is no token count: the reader's per-sidecar token ceiling does not bound it) moves the
answer by that factor at most, in the window or through the history's size. On honest
traffic a 30 s window's tokens per request stay well within it of an hour's: on the
synthesized day and the Azure code hour of docs/tuning.md it never bound.

While the history holds fewer than ``MIN_REQUESTS`` arrivals over L (a new workload, a
fresh Redis, sidecars that do not count arrivals yet), or the window counts none or holds
a record that does not count them (``WorkloadSeries``' ``na`` series), the demand is the
token rate's as without the option. Minutes the history keeps without an arrival count
(written before it was kept, or with a record that does not count them) are left out of L.
The sized demand stands for the arrivals whatever ``arrivalMargin`` says: a count of
requests has no served twin to choose from.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from scaler.forecast import MINUTE_S, MinuteCounts
from scaler.metadata import ScalerSettings

# Below this many arrivals over L, the size is too uncertain to replace the token rate.
MIN_REQUESTS = 30
# The sized demand stays within this factor of the window's token rate, either way.
SIZED_RANGE = 4.0

Floats = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Size:
    """Weighted tokens served per arriving request over ``minutes`` minutes of history."""

    tokens_per_request: float
    minutes: int
    requests: float

    def describe(self) -> str:
        return (
            f"{self.tokens_per_request:.1f} weighted tokens per arriving request over the last "
            f"{self.minutes} min ({self.requests:.0f} requests)"
        )


def request_size(history: Mapping[int, MinuteCounts], now_s: float, settings: ScalerSettings) -> Size | None:
    """The size over the ``sizeWindowSeconds`` that end a minute before the minute of
    ``now_s``; None when the option is off or the history knows too few arrivals."""
    span = settings.size_window_s // MINUTE_S
    if span <= 0:
        return None
    now_min = int(now_s // MINUTE_S)
    pw, gw = settings.prompt_weight, settings.generation_weight
    tokens = requests = 0.0
    minutes = 0
    for minute in range(now_min - 1 - span, now_min - 1):
        counts = history.get(minute)
        if counts is None or counts.arrived_requests is None:
            continue
        tokens += pw * counts.served_prompt + gw * counts.served_generation
        requests += counts.arrived_requests
        minutes += 1
    if requests < MIN_REQUESTS or not tokens > 0:
        return None
    return Size(tokens / requests, minutes, requests)


def sized_demand(arrivals: float, tokens_per_request: float, token_rate: float) -> float:
    """``arrivals`` (per second) x ``tokens_per_request``, within ``SIZED_RANGE`` x the window's
    ``token_rate`` either way."""
    rate = max(token_rate, 0.0)
    return min(max(arrivals * tokens_per_request, rate / SIZED_RANGE), rate * SIZED_RANGE)


def sized_demands(arrivals: Floats, tokens_per_request: float, token_rate: Floats) -> Floats:
    """``sized_demand`` of each pair of ``arrivals`` and ``token_rate``."""
    rate = np.maximum(token_rate, 0.0)
    out: Floats = np.clip(arrivals * tokens_per_request, rate / SIZED_RANGE, rate * SIZED_RANGE)
    return out
