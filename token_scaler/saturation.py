"""The scaler -> sidecar saturation signal: one small Redis key per workload (version 1).

The scaler knows what no sidecar does: how many replicas the workload's demand asks for,
and whether that is above what it may run. It publishes that once per evaluation; every
sidecar of the workload reads it about once a second, off the request path, to send a
burst to a cheaper model (``downgrade.<model>.whenSaturated`` in the policy file) instead
of queueing it behind a GPU cold start.

Key (in the workload's hash slot, next to its stream)::

    tokenscaler:v1:{<namespace>/<name>}:saturation

Value, a JSON object, written with ``SET ... PX 30000`` so that a scaler which stops
publishing leaves no stale "saturated" behind::

    v          1
    ts         integer ms, Redis clock (when the scaler evaluated)
    saturated  true | false
    reason     "max-replicas" (desired >= maxReplicas) | "demand" (arrival rate above
               served rate, the queue grows) | "" when not saturated
    desired    replicas the demand asks for (ceil(demand x headroom / per-replica target))
    max        the workload's replica ceiling, 0 when unknown

A reader treats a missing key, a value it cannot decode, a version it does not know, or a
``ts`` older than ``MAX_AGE_MS`` as "not saturated": the signal can only downgrade, so
when in doubt it does nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from token_scaler.record import KEY_PREFIX

VERSION = 1
TTL_MS = 30_000
MAX_AGE_MS = 30_000
MAX_REPLICAS, DEMAND = "max-replicas", "demand"


def saturation_key(workload: str) -> str:
    return f"{KEY_PREFIX}:{{{workload}}}:saturation"


@dataclass(frozen=True, slots=True)
class Saturation:
    saturated: bool
    reason: str = ""
    desired: int = 0
    max: int = 0
    ts_ms: int = 0

    def encode(self) -> str:
        return json.dumps(
            {
                "v": VERSION,
                "ts": self.ts_ms,
                "saturated": self.saturated,
                "reason": self.reason,
                "desired": self.desired,
                "max": self.max,
            },
            separators=(",", ":"),
        )


NOT_SATURATED = Saturation(False)


def decode(raw: bytes | str | None, now_ms: int) -> Saturation:
    """The signal as a reader should act on it (``NOT_SATURATED`` when in doubt)."""
    if raw is None:
        return NOT_SATURATED
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return NOT_SATURATED
    if not isinstance(doc, dict) or doc.get("v") != VERSION:
        return NOT_SATURATED
    ts, saturated = doc.get("ts"), doc.get("saturated")
    if not isinstance(ts, int) or not isinstance(saturated, bool) or now_ms - ts > MAX_AGE_MS:
        return NOT_SATURATED
    reason = doc.get("reason")
    desired, ceiling = doc.get("desired"), doc.get("max")
    return Saturation(
        saturated,
        reason if isinstance(reason, str) else "",
        desired if isinstance(desired, int) else 0,
        ceiling if isinstance(ceiling, int) else 0,
        ts,
    )
