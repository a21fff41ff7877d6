"""Which rate is a window's demand: the arrival rate, the served rate, or the one by a margin.

Both rates count the same tokens (every arrival estimate is corrected to the request's real
usage when it ends), at different moments: ``arrived`` when a request comes in, ``served``
as its prompt is read and its tokens stream. While the replicas keep up the two differ by
timing only. When they fall behind, the served rate stops at what they can serve and only
the arrivals show how far behind they are.

By default the demand is the higher of the two (``arrivalMargin`` 0). A margin makes it the
served rate unless the arrivals run more than that fraction above it; ``off`` (an infinite
margin) makes it the served rate always, the arrivals counting only while nothing is served
(a workload at zero replicas, requests held at a gateway). Reacting to arrivals is a bet that
the excess lasts: a burst that ends before new replicas are ready is paid for and not served
by them, while a fleet that trusts its served rate alone still grows by its headroom at every
sync, more slowly. Which pays depends on the traffic; ``token-scaler simulate --sweep``
searches both (docs/tuning.md has the figures).
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

DEFAULT_MARGIN = 0.0

Floats = npt.NDArray[np.float64]


def arrivals_lead(served: float, arrived: float, margin: float = DEFAULT_MARGIN) -> bool:
    """Whether the arrival rate is the demand: at least ``1 + margin`` times the served rate
    (``inf``: only while nothing is served)."""
    return arrived >= served * (1.0 + margin) if served > 0 else arrived >= served


def demand_of(served: float, arrived: float, margin: float = DEFAULT_MARGIN) -> float:
    """The demand of one window (never negative)."""
    return max(arrived if arrivals_lead(served, arrived, margin) else served, 0.0)


def demands_of(served: Floats, arrived: Floats, margin: float = DEFAULT_MARGIN) -> Floats:
    """``demand_of`` each pair of ``served`` and ``arrived``."""
    if margin == 0:  # served * (1 + 0) is served: one comparison wherever served is positive or not
        lead = arrived >= served
    elif math.isinf(margin):  # off: arrivals lead only where nothing is served
        lead = ~(served > 0) & (arrived >= served)
    else:
        lead = np.where(served > 0, arrived >= served * (1.0 + margin), arrived >= served)
    out: Floats = np.maximum(np.where(lead, arrived, served), 0.0)
    return out
