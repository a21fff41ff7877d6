"""The sidecar -> scaler stream record: the one contract between the two components.

Version 1. Everything both sides must agree on lives here: key names, the entry
layout, the append script, trimming, and what a reader does with a bad entry.

Keys (one stream per workload; the ``{workload}`` hash tag keeps a workload's keys
in one Redis Cluster slot, so the append script may touch them together)::

    tokenscaler:v1:{<namespace>/<name>}:tokens          the stream
    tokenscaler:v1:{<namespace>/<name>}:seq:<sidecar>   last sequence number appended

Entries. A sidecar appends at most one entry per flush interval (1 s by default),
whatever its request rate, so Redis load grows with pods, not with requests. An
entry holds what happened at that sidecar during ``(ts - dt, ts]``:

    v    "1"                      schema version; a reader skips versions it does not know
    sc   sidecar id               unique per sidecar process ([A-Za-z0-9._-], <= 128 chars)
    seq  integer                  per sidecar, +1 per entry; makes retried appends idempotent
                                  (a sidecar starts at its start-up time in ms: above what a
                                  predecessor with the same id stored)
    ts   integer ms               end of the interval, on the Redis clock as the sidecar
                                  estimates it (local clock + offset learnt from Redis TIME)
    dt   integer ms               length of the interval (> 0)
    m    JSON {model: [sp, sg, ap, ag, rq, in, wf, bp, bg, ar]}   (ar: optional)
    t    JSON {tenant: {model: [p, g, rq]}}   (optional)
    s    JSON {"run": n, "wait": n, "kv": x}  (optional) the model server's own gauges at
                                  ts, read from its Prometheus metrics: requests running
                                  and waiting in the server, KV-cache usage as a fraction
                                  0..1; a key is left out when the server does not say it

Per model, counters for the interval (may be negative: they carry corrections):
    sp, sg  prompt / generated tokens served (generated tokens count as chunks pass,
            then are corrected to the response's ``usage`` when the request ends)
    ap, ag  prompt / generated tokens of arriving requests: estimated at arrival,
            corrected to ``usage`` at the end, so that over a request's life
            sum(ap) == sum(sp) == its real prompt tokens, and likewise for g.
            The arrival rate is the demand signal: it keeps growing when the
            replicas are saturated and the served rate cannot.
    rq      requests that ended
    ar      requests that arrived (a trailing item, absent from older writers: read as 0 and
            known to be unknown, so a reader sizing demand by arrivals does not take it
            for none).
            A gateway counts a request when it starts holding it and takes it back
            when it stops, as it does ap and ag; the sidecar that serves it counts it.
and gauges at ``ts`` (never negative):
    in      requests in flight           wf  requests waiting for their first token
    bp, bg  prompt / generated tokens arrived but not served yet (estimates)

Per tenant and model: tokens served (prompt, generated) and requests ended, for cost
and budget accounting. Unknown extra fields and extra trailing array items are
ignored, so version 1 may grow additively (``s`` was added so: a reader that does not
know it still reads the counts of the entries that carry it).

    r    "gateway"                (optional; absent: a sidecar) who wrote the entry

Gateways (``token-scaler gateway``) write to the same stream, under ids of their own,
and count only what they hold: a request waiting at a gateway (no live replica, or
every replica at its in-flight token cap) is counted when it starts waiting, as the
sidecar counts an arrival (ap, ag: prompt estimate and n x max_tokens or the default;
ar: 1; gauges in, wf, bp, bg), and when it stops waiting -- handed to a replica, refused,
timed out, or its client gone -- its ap, ag and ar are taken back (negative counters) and
its gauges drop. A gateway never writes sp, sg or rq: the sidecar of the replica that
serves the request counts its arrival, what it serves and its end, as for a request
that came straight to it. So over a request's life the gateway's counts sum to zero
and the sidecar's to its real tokens: a reader sums every entry as it is, and nothing
is counted twice. While it waits, the held request is demand no sidecar can see; that
is how a workload at zero replicas becomes active. The entry a gateway writes when it
starts holding requests after holding none is stamped at the end of the last complete
second (``ts`` = that second's last millisecond, ``dt`` = 1): readers evaluate complete
seconds only, and this entry must count at once, not a second later; its take-back
lands later, so the shift of under a second never lets a request count twice.
Gateway entries are not replicas: readers leave them out of the live sidecars.

Trimming: by time, to ``retention`` (default 1200 s = twice the longest window
a ScaledObject may ask for: the panic hold looks back one window at rates that each
span a window). The append script trims with ``XADD MINID ~``.

Time: a reader places an entry at ``min(ts, id_ms)``: an entry cannot describe time
after Redis stored it, so a sidecar whose clock runs ahead is clamped to Redis' clock,
while entries buffered through an outage (id much later than ts) land in the time
they describe.

Duplicates: the append script stores an entry only if its ``seq`` is above the last
``seq`` stored for that sidecar, so a retried append whose reply was lost adds
nothing. Losses: a writer keeps what it delivered for ``outbox.RESEND_S`` and tells the
script the highest ``seq`` it stored; when Redis holds a lower one (a failover lost the
last appends, replication being asynchronous) the script appends nothing and the writer
sends the lost records again first. A reader likewise applies a sidecar's entry only if
its ``seq`` is above the last it applied for that sidecar: Redis forgets the seq keys
when it restarts without persistence (or fails over to a replica that lagged), and an
append whose reply the crash lost, or a record sent again, is then stored again.
Sidecars write one stream concurrently; no order across sidecars is assumed.

Bounds: what an entry may claim, whoever wrote it (a sidecar of any version, or
anything else with access to the stream). A count whose magnitude reaches 2**53 makes the
entry bad (below), and so does a ``kv`` outside 0..1. The tokens one sidecar (``sc``)
reports for one second of the stream (entries placed in that second; an entry whose ``dt``
spans k > 1 seconds may carry k seconds' worth, up to 60) are plausible up to a ceiling in
weighted tokens/s, the larger of served and arrived: ``20 x tokensPerSecondPerReplica`` of
the ScaledObject that reads the stream (the scaler's ``--sidecar-ceiling-multiple``), or
``--max-sidecar-tokens-per-second`` (gateway entries excepted: their arrivals are taken
back later, count for count). A reader scales an entry past it down to what is
left of the ceiling in that second (its token counters, per model and per tenant, by one
factor; requests and gauges as they are), applies it, and counts it
(``implausibleEntries``); it is not skipped. Sidecars bound each response's ``usage``
before counting it (sidecar/usage_bounds.py), so an honest sidecar's entries stay below
the ceiling unless one replica serves 20 replicas' worth of tokens in a second.

Bad entries: a reader skips an entry it cannot decode, counts it in a metric, logs the
first one per stream with the reason (``RecordError`` names field and value), and goes
on. It never crashes on, nor guesses the meaning of, a bad entry.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from token_scaler.errors import RecordError

SCHEMA_VERSION = 1
KEY_PREFIX = f"tokenscaler:v{SCHEMA_VERSION}"
DEFAULT_RETENTION_S = 1200
MAX_MODELS_PER_ENTRY = 64
MAX_TENANTS_PER_ENTRY = 1024
_MAX_ABS = 2**53

_WORKLOAD = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?/[a-z0-9]([-.a-z0-9]{0,251}[a-z0-9])?$")
_SIDECAR = re.compile(r"^[A-Za-z0-9._-]{1,128}$")

MODEL_FIELDS = ("sp", "sg", "ap", "ag", "rq", "in", "wf", "bp", "bg", "ar")
# the items every version-1 writer sends; later ones are optional trailing items
_REQUIRED_MODEL_FIELDS = 9
_GAUGES = frozenset({"in", "wf", "bp", "bg"})
SIDECAR, GATEWAY = "sidecar", "gateway"
ROLES = frozenset({SIDECAR, GATEWAY})


def validate_workload(workload: str) -> str:
    """Return ``workload`` if it is ``<namespace>/<name>`` in Kubernetes' naming rules."""
    if not _WORKLOAD.match(workload):
        raise ValueError(
            "expected <namespace>/<name>: lowercase letters, digits and '-' "
            "(and '.' in the name), starting and ending with a letter or digit"
        )
    return workload


def stream_key(workload: str) -> str:
    return f"{KEY_PREFIX}:{{{workload}}}:tokens"


def seq_key(workload: str, sidecar: str) -> str:
    return f"{KEY_PREFIX}:{{{workload}}}:seq:{sidecar}"


def workload_keys(workload: str) -> str:
    """A ``SCAN MATCH`` pattern for every key of one workload (they share its hash tag)."""
    return f"{KEY_PREFIX}:{{{workload}}}*"


@dataclass
class ModelCounts:
    served_prompt: int = 0
    served_generation: int = 0
    arrived_prompt: int = 0
    arrived_generation: int = 0
    requests: int = 0
    inflight: int = 0
    waiting: int = 0
    backlog_prompt: int = 0
    backlog_generation: int = 0
    arrived_requests: int = 0
    # False for a record from a writer that does not count arrivals (no ``ar`` item): its
    # ``arrived_requests`` 0 means unknown, not none. Not part of the wire list.
    arrivals_known: bool = field(default=True, kw_only=True)

    def as_list(self) -> list[int]:
        return [
            self.served_prompt,
            self.served_generation,
            self.arrived_prompt,
            self.arrived_generation,
            self.requests,
            self.inflight,
            self.waiting,
            self.backlog_prompt,
            self.backlog_generation,
            self.arrived_requests,
        ]

    def counters(self) -> tuple[int, ...]:
        """The counters (sp, sg, ap, ag, rq, ar): what happened in the interval, unlike the gauges."""
        return (
            self.served_prompt,
            self.served_generation,
            self.arrived_prompt,
            self.arrived_generation,
            self.requests,
            self.arrived_requests,
        )

    def clear_counters(self) -> None:
        """Zero the counters and keep the gauges: a writer's next interval starts here."""
        self.served_prompt = self.served_generation = 0
        self.arrived_prompt = self.arrived_generation = 0
        self.requests = self.arrived_requests = 0


@dataclass
class TenantCounts:
    prompt: int = 0
    generation: int = 0
    requests: int = 0


@dataclass(frozen=True)
class ServerGauges:
    """The model server's own view at ``ts`` (None: it does not report that gauge)."""

    running: int | None = None
    waiting: int | None = None
    kv_usage: float | None = None  # 0..1

    def encode(self) -> dict[str, int | float]:
        out: dict[str, int | float] = {}
        if self.running is not None:
            out["run"] = self.running
        if self.waiting is not None:
            out["wait"] = self.waiting
        if self.kv_usage is not None:
            out["kv"] = round(self.kv_usage, 4)
        return out


@dataclass
class Record:
    sidecar: str
    seq: int
    ts_ms: int
    interval_ms: int
    models: dict[str, ModelCounts] = field(default_factory=dict)
    tenants: dict[str, dict[str, TenantCounts]] = field(default_factory=dict)
    server: ServerGauges | None = None
    role: str = SIDECAR

    def encode(self) -> dict[str, str]:
        """The stream entry's field/value pairs."""
        fields = {
            "v": str(SCHEMA_VERSION),
            "sc": self.sidecar,
            "seq": str(self.seq),
            "ts": str(self.ts_ms),
            "dt": str(self.interval_ms),
            "m": json.dumps(
                {name: counts.as_list() for name, counts in self.models.items()},
                separators=(",", ":"),
            ),
        }
        if self.role != SIDECAR:
            fields["r"] = self.role
        if self.tenants:
            fields["t"] = json.dumps(
                {
                    tenant: {m: [c.prompt, c.generation, c.requests] for m, c in per_model.items()}
                    for tenant, per_model in self.tenants.items()
                },
                separators=(",", ":"),
            )
        if self.server is not None and self.server.encode():
            fields["s"] = json.dumps(self.server.encode(), separators=(",", ":"))
        return fields


def _text(fields: Mapping[Any, Any], name: str) -> str:
    raw = fields.get(name)
    if raw is None:
        raw = fields.get(name.encode())
    if raw is None:
        raise RecordError(name, None, "missing")
    if isinstance(raw, bytes):
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise RecordError(name, raw, "not UTF-8") from None
    return str(raw)


def _int(fields: Mapping[Any, Any], name: str, *, minimum: int | None = None) -> int:
    raw = _text(fields, name)
    try:
        value = int(raw)
    except ValueError:
        raise RecordError(name, raw, "expected an integer") from None
    if minimum is not None and value < minimum:
        raise RecordError(name, raw, f"expected an integer >= {minimum}")
    return value


def _count(name: str, value: object, *, gauge: bool) -> int:
    # bool is an int subclass; JSON true/false is not a count.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecordError(name, value, "expected an integer")
    if isinstance(value, float):
        if not math.isfinite(value) or value != int(value):
            raise RecordError(name, value, "expected an integer")
        value = int(value)
    if abs(value) >= _MAX_ABS:
        raise RecordError(name, value, "out of range")
    if gauge and value < 0:
        raise RecordError(name, value, "a gauge cannot be negative")
    return value


def _json(fields: Mapping[Any, Any], name: str) -> Any:
    raw = _text(fields, name)
    try:
        return json.loads(raw)
    except ValueError:
        raise RecordError(name, raw, "not valid JSON") from None


def decode(fields: Mapping[Any, Any]) -> Record:
    """Decode one stream entry (keys and values as ``bytes`` or ``str``).

    Raises ``RecordError`` naming the first bad field.
    """
    version = _text(fields, "v")
    if version != str(SCHEMA_VERSION):
        raise RecordError("v", version, f"unsupported schema version (this reader knows {SCHEMA_VERSION})")
    sidecar = _text(fields, "sc")
    if not _SIDECAR.match(sidecar):
        raise RecordError("sc", sidecar, "expected 1-128 characters of [A-Za-z0-9._-]")
    seq = _int(fields, "seq", minimum=0)
    ts_ms = _int(fields, "ts", minimum=0)
    interval_ms = _int(fields, "dt", minimum=1)

    raw_models = _json(fields, "m")
    if not isinstance(raw_models, dict):
        raise RecordError("m", raw_models, "expected a JSON object {model: [counts]}")
    if len(raw_models) > MAX_MODELS_PER_ENTRY:
        raise RecordError("m", len(raw_models), f"more than {MAX_MODELS_PER_ENTRY} models")
    models: dict[str, ModelCounts] = {}
    for model, values in raw_models.items():
        where = f"m[{model!r}]"
        if not isinstance(values, list) or len(values) < _REQUIRED_MODEL_FIELDS:
            raise RecordError(
                where, values, f"expected a list of {_REQUIRED_MODEL_FIELDS} or {len(MODEL_FIELDS)} integers"
            )
        counts = [
            _count(f"{where}.{key}", value, gauge=key in _GAUGES)
            for key, value in zip(MODEL_FIELDS, values, strict=False)
        ]
        models[model] = ModelCounts(*counts, arrivals_known=len(counts) == len(MODEL_FIELDS))

    tenants: dict[str, dict[str, TenantCounts]] = {}
    if "t" in fields or b"t" in fields:
        raw_tenants = _json(fields, "t")
        if not isinstance(raw_tenants, dict):
            raise RecordError("t", raw_tenants, "expected a JSON object {tenant: {model: [p, g, rq]}}")
        if len(raw_tenants) > MAX_TENANTS_PER_ENTRY:
            raise RecordError("t", len(raw_tenants), f"more than {MAX_TENANTS_PER_ENTRY} tenants")
        for tenant, per_model in raw_tenants.items():
            if not isinstance(per_model, dict):
                raise RecordError(f"t[{tenant!r}]", per_model, "expected a JSON object")
            tenants[tenant] = {}
            for model, values in per_model.items():
                where = f"t[{tenant!r}][{model!r}]"
                if not isinstance(values, list) or len(values) < 3:
                    raise RecordError(where, values, "expected a list of 3 integers")
                p, g, rq = (_count(where, v, gauge=False) for v in values[:3])
                tenants[tenant][model] = TenantCounts(p, g, rq)
    server = _server(fields) if "s" in fields or b"s" in fields else None
    role = SIDECAR
    if "r" in fields or b"r" in fields:
        role = _text(fields, "r")
        if role not in ROLES:
            raise RecordError("r", role, f"expected one of {', '.join(sorted(ROLES))}")
    return Record(sidecar, seq, ts_ms, interval_ms, models, tenants, server, role)


def _server(fields: Mapping[Any, Any]) -> ServerGauges:
    raw = _json(fields, "s")
    if not isinstance(raw, dict):
        raise RecordError("s", raw, 'expected a JSON object {"run": n, "wait": n, "kv": x}')
    running = _count("s.run", raw["run"], gauge=True) if "run" in raw else None
    waiting = _count("s.wait", raw["wait"], gauge=True) if "wait" in raw else None
    kv = raw.get("kv")
    if kv is not None and (
        isinstance(kv, bool) or not isinstance(kv, (int, float)) or not 0 <= kv <= 1 or kv != kv
    ):
        raise RecordError("s.kv", kv, "expected a fraction from 0 to 1")
    return ServerGauges(running, waiting, None if kv is None else float(kv))


def entry_id_ms(entry_id: bytes | str) -> int:
    """The ms part of a stream entry ID (``<ms>-<n>``)."""
    raw = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    return int(raw.split("-", 1)[0])


def entry_time_ms(record: Record, entry_id: bytes | str) -> int:
    """Where a reader places an entry in time: ``min(ts, the ms part of its stream ID)``."""
    return min(record.ts_ms, entry_id_ms(entry_id))


# The append script. KEYS: stream, seq key. ARGV: retention ms, seq-key TTL s, entry
# count, then per entry: seq, field count, field/value pairs. Returns
# {entries added, last ID added or "", Redis time in ms}.
APPEND_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local minid = tostring(now - tonumber(ARGV[1]))
local last = tonumber(redis.call('GET', KEYS[2]) or '-1')
if last < tonumber(ARGV[4]) then
  return {-1, '', now, last}
end
local i = 5
local added = 0
local lastid = ''
for _ = 1, tonumber(ARGV[3]) do
  local seq = tonumber(ARGV[i])
  local n = tonumber(ARGV[i + 1])
  if seq > last then
    local args = {'XADD', KEYS[1], 'MINID', '~', minid, '*'}
    for j = i + 2, i + 1 + 2 * n do
      args[#args + 1] = ARGV[j]
    end
    lastid = redis.call(unpack(args))
    last = seq
    added = added + 1
  end
  i = i + 2 + 2 * n
end
if last >= 0 then
  redis.call('SET', KEYS[2], tostring(last), 'EX', tonumber(ARGV[2]))
end
return {added, lastid, now}
"""


def append_args(records: list[Record], retention_s: int, *, expect: int = -1) -> list[str | int]:
    """ARGV for ``APPEND_SCRIPT``; records must share one sidecar and ascend by seq.

    ``expect``: the highest seq the writer had stored before. When Redis holds less (a
    failover promoted a replica that had not received the last appends), nothing is appended
    and the reply is ``{-1, '', now, seq stored}``, so the writer sends the lost records first.
    """
    argv: list[str | int] = [retention_s * 1000, retention_s + 60, len(records), expect]
    for record in records:
        encoded = record.encode()
        argv.append(record.seq)
        argv.append(len(encoded))
        for name, value in encoded.items():
            argv.append(name)
            argv.append(value)
    return argv
