"""Replica presence: how sidecars tell gateways where they are and how busy they are.

Version 1. The sidecar -> gateway contract, as ``record.py`` is the sidecar -> scaler one.
Keys (hash-tagged per workload, like the stream, so the scripts touch one Cluster slot)::

    tokenscaler:v1:{<namespace>/<name>}:replicas     hash: sidecar id -> announcement (JSON)
    tokenscaler:v1:{<namespace>/<name>}:heartbeats   sorted set: sidecar id -> Redis time (ms)
                                                     of its last heartbeat

A sidecar started with an address to advertise sends a heartbeat every
``HEARTBEAT_S``: its announcement and the time, on Redis' clock (``HEARTBEAT`` reads
``TIME`` itself, so the hosts' clocks never matter). At SIGTERM it removes itself
(``LEAVE``) before it drains, so gateways stop sending it new requests at once. A
sidecar that dies without leaving drops out of ``LIVE`` once its last heartbeat is
older than the gateway's liveness bound, and out of the keys after ``FORGET_MS``.

Announcement (JSON object; unknown keys are ignored, so version 1 may grow)::

    v         1
    url       base URL the sidecar's proxy is reached at (http://10.0.3.7:8080)
    models    models it serves ([] when unknown: any model)
    capacity  in-flight tokens (prompt + max generation) it takes at once; 0: no cap
    slots     requests it takes at once (the server's concurrency, vLLM's --max-num-seqs); 0: no cap
    in        requests in flight at the sidecar          (all gateways' requests, and
    bp        prompt tokens not processed yet             direct clients', as its meter
    bg        generation tokens still expected            counts them)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from token_scaler.record import KEY_PREFIX

PRESENCE_VERSION = 1
HEARTBEAT_S = 1.0
# A member silent this long is removed by the next heartbeat of any sidecar of the workload;
# the keys themselves expire this long after the last heartbeat of all of them.
FORGET_MS = 60_000


def replicas_key(workload: str) -> str:
    return f"{KEY_PREFIX}:{{{workload}}}:replicas"


def heartbeats_key(workload: str) -> str:
    return f"{KEY_PREFIX}:{{{workload}}}:heartbeats"


def presence_keys(workload: str) -> list[str]:
    return [replicas_key(workload), heartbeats_key(workload)]


_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS: replicas, heartbeats. ARGV: sidecar id, announcement, forget ms. Returns Redis ms.
HEARTBEAT = (
    _NOW
    + """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], now, ARGV[1])
local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - tonumber(ARGV[3]))
for _, id in ipairs(gone) do
  redis.call('HDEL', KEYS[1], id)
  redis.call('ZREM', KEYS[2], id)
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return now
"""
)

# KEYS: replicas, heartbeats. ARGV: sidecar id.
LEAVE = """
redis.call('HDEL', KEYS[1], ARGV[1])
return redis.call('ZREM', KEYS[2], ARGV[1])
"""

# KEYS: replicas, heartbeats. ARGV: liveness ms. Returns {now, id, ms, announcement, ...}
# for every sidecar whose last heartbeat is within the liveness bound.
LIVE = (
    _NOW
    + """
local live = redis.call('ZRANGEBYSCORE', KEYS[2], now - tonumber(ARGV[1]), '+inf', 'WITHSCORES')
local out = {now}
for i = 1, #live, 2 do
  local body = redis.call('HGET', KEYS[1], live[i])
  if body then
    out[#out + 1] = live[i]
    out[#out + 1] = live[i + 1]
    out[#out + 1] = body
  end
end
return out
"""
)


@dataclass(frozen=True, slots=True)
class Announcement:
    url: str
    models: tuple[str, ...] = ()
    capacity: int = 0
    inflight: int = 0
    backlog_prompt: int = 0
    backlog_generation: int = 0
    slots: int = 0

    def encode(self) -> str:
        return json.dumps(
            {
                "v": PRESENCE_VERSION,
                "url": self.url,
                "models": list(self.models),
                "capacity": self.capacity,
                "in": self.inflight,
                "bp": self.backlog_prompt,
                "bg": self.backlog_generation,
                "slots": self.slots,
            },
            separators=(",", ":"),
        )


class PresenceError(ValueError):
    """An announcement that breaks the contract; the message names the field."""


def _count(doc: dict[str, Any], key: str) -> int:
    value = doc.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise PresenceError(f"{key}: expected a whole number >= 0, got {value!r}")
    return value


def decode(raw: bytes | str) -> Announcement:
    """Decode an announcement; ``PresenceError`` names the first bad field."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise PresenceError("not valid JSON") from None
    if not isinstance(doc, dict):
        raise PresenceError("expected a JSON object")
    if doc.get("v") != PRESENCE_VERSION:
        raise PresenceError(f"v: unsupported version {doc.get('v')!r} (this reader knows {PRESENCE_VERSION})")
    url = doc.get("url")
    if (
        not isinstance(url, str)
        or urlparse(url).scheme not in ("http", "https")
        or not urlparse(url).hostname
    ):
        raise PresenceError(f"url: expected an http(s) URL with a host, got {url!r}")
    models = doc.get("models", [])
    if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
        raise PresenceError(f"models: expected a list of strings, got {models!r}")
    return Announcement(
        url.rstrip("/"),
        tuple(models),
        _count(doc, "capacity"),
        _count(doc, "in"),
        _count(doc, "bp"),
        _count(doc, "bg"),
        _count(doc, "slots"),
    )
