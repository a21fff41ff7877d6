"""ScaledObject trigger metadata -> typed settings.

Each key is declared once (``SPEC``): the settings field it fills, how its value is read
and checked, the line that documents it; its default is the field's default in
``ScalerSettings``. The table in docs/scaler.md, the errors and ``KEYS`` derive from it.

KEDA forwards the whole trigger metadata map (its own keys such as ``scalerAddress``
included), so unknown keys are ignored. A key that is present with a bad value is an
error naming the key, the value and what is allowed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from scaler.demand import DEFAULT_MARGIN
from token_scaler.errors import MetadataError
from token_scaler.record import validate_workload

MAX_WINDOW_S = 600
# The burst envelope looks back at most as far as the sidecars' streams keep entries by
# default (token_scaler.record.DEFAULT_RETENTION_S), so a scaler that starts or restarts
# backfills every second it reads and replicas agree.
BURST_LOOKBACK_MAX_S = 2 * MAX_WINDOW_S
BURST_WINDOW_MAX_S = 60
SIZE_WINDOW_MAX_S = 86400  # a day of the minute history (it keeps forecast.HISTORY_DAYS)


@dataclass(frozen=True)
class ScalerSettings:
    workload: str
    tokens_per_second_per_replica: float
    headroom: float = 1.3
    window_s: int = 60
    prompt_weight: float = 1.0
    generation_weight: float = 1.0
    panic_window_s: int = 6
    panic_threshold: float = 2.0
    panic_hold_s: int = 15
    activation_tokens_per_second: float = 0.0
    model: str | None = None
    max_replicas: int = 0
    predictive: bool = False
    lead_s: int = 300
    max_forecast_error: float = 0.3
    kv_cache_target: float | None = None
    in_flight_per_replica: float | None = None
    burst_window_s: int = 0  # 0: no burst envelope
    burst_quantile: float = 0.9
    burst_lookback_s: int = BURST_LOOKBACK_MAX_S
    arrival_margin: float = DEFAULT_MARGIN  # inf: the served rate, arrivals only while none is served
    size_window_s: int = 0  # 0: the token rate; else arriving requests x their size over this (scaler.size)

    @property
    def target(self) -> float:
        """Per-replica target KEDA's HPA divides the workload's value by."""
        return self.tokens_per_second_per_replica / self.headroom


Read = Callable[[str, str], Any]  # (key, raw value) -> value; raises MetadataError


@dataclass(frozen=True)
class Key:
    """One trigger metadata key: the settings field it fills, how its value is read and
    checked, and the line that documents it (errors say "expected <help>"). Its default is
    the field's default in ``ScalerSettings``."""

    field: str
    help: str
    read: Read
    default_text: str | None = None  # what the docs show when the field's default is not it


def _number(key: str, raw: str, ok: Callable[[float], bool], allowed: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise MetadataError(key, raw, allowed) from None
    if not math.isfinite(value) or not ok(value):
        raise MetadataError(key, raw, allowed)
    return value


def _whole(key: str, raw: str, low: int, high: int, allowed: str) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        raise MetadataError(key, raw, allowed) from None
    if not low <= value <= high:
        raise MetadataError(key, raw, allowed)
    return value


def number(ok: Callable[[float], bool]) -> Read:
    return lambda key, raw: _number(key, raw, ok, _expected(key))


def whole(low: int, high: int) -> Read:
    return lambda key, raw: _whole(key, raw, low, high, _expected(key))


def _boolean(key: str, raw: str) -> bool:
    value = raw.strip().lower()
    if value not in ("true", "false"):
        raise MetadataError(key, raw, _expected(key))
    return value == "true"


def _text(key: str, raw: str) -> str:
    return raw


def _model(key: str, raw: str) -> str:
    if not raw.strip():
        raise MetadataError(key, raw, "expected a model name (leave the key out to count all models)")
    return raw


def _minutes(key: str, raw: str) -> int:
    value = _whole(key, raw, 0, SIZE_WINDOW_MAX_S, _expected(key))
    if value % 60:
        raise MetadataError(key, raw, _expected(key))
    return value


def _margin(key: str, raw: str) -> float:
    if raw.strip().lower() == "off":
        return math.inf
    return _number(key, raw, lambda v: 0 <= v <= 10, _expected(key))


SPEC: dict[str, Key] = {
    "workload": Key(
        "workload",
        "whose sidecar streams to read, <namespace>/<name>",
        _text,
        "<namespace>/<name>",
    ),
    "tokensPerSecondPerReplica": Key(
        "tokens_per_second_per_replica",
        "weighted tokens/s one replica serves, a number > 0",
        number(lambda v: v > 0),
        "required",
    ),
    "headroom": Key(
        "headroom",
        "buffer factor, target = tokensPerSecondPerReplica / headroom, from 1 to 10",
        number(lambda v: 1 <= v <= 10),
    ),
    "windowSeconds": Key(
        "window_s",
        f"stable rolling window in seconds, a whole number from 10 to {MAX_WINDOW_S}",
        whole(10, MAX_WINDOW_S),
    ),
    "promptWeight": Key("prompt_weight", "weight of prompt tokens, a number >= 0", number(lambda v: v >= 0)),
    "generationWeight": Key(
        "generation_weight", "weight of generated tokens, a number >= 0", number(lambda v: v >= 0)
    ),
    "panicWindowSeconds": Key(
        "panic_window_s",
        "short burst window in seconds, a whole number from 1 to half the window",
        lambda key, raw: raw,  # checked against windowSeconds in ``parse``
    ),
    "arrivalMargin": Key(
        "arrival_margin",
        "the arrival rate is the demand when at least 1 + this x the served rate, else the served "
        "rate, a number from 0 to 10 (0: the higher of the two), or off (the served rate; arrivals "
        "only while nothing is served)",
        _margin,
    ),
    "sizeWindowSeconds": Key(
        "size_window_s",
        "the window's demand is its arriving requests/s x the weighted tokens per arriving request "
        "over this many seconds of the minute history (kept in Redis), not its token rate; 0 (off) "
        f"or a whole number of minutes from 60 to {SIZE_WINDOW_MAX_S} in seconds",
        _minutes,
    ),
    "panicThreshold": Key(
        "panic_threshold",
        "panic when the short window asks for >= this x the replicas reporting now, a number > 1",
        number(lambda v: v > 1),
    ),
    "panicHoldSeconds": Key(
        "panic_hold_s",
        f"panic ends this long after its last trigger, a whole number from 1 to {MAX_WINDOW_S}",
        whole(1, MAX_WINDOW_S),
    ),
    "burstWindowSeconds": Key(
        "burst_window_s",
        "size capacity for bursts too: answer at least the burstQuantile of the demand of every "
        "window of this many seconds in the last burstLookbackSeconds; 0 (off) or a whole number "
        f"from 1 to {BURST_WINDOW_MAX_S}",
        whole(0, BURST_WINDOW_MAX_S),
    ),
    "burstQuantile": Key(
        "burst_quantile",
        "which quantile of the burst windows' demand, a number in (0, 1]",
        number(lambda v: 0 < v <= 1),
    ),
    "burstLookbackSeconds": Key(
        "burst_lookback_s",
        f"how far back the burst windows reach, a whole number from 60 to {BURST_LOOKBACK_MAX_S} "
        "(at most the sidecars' stream retention)",
        whole(60, BURST_LOOKBACK_MAX_S),
    ),
    "activationTokensPerSecond": Key(
        "activation_tokens_per_second",
        "IsActive is true above this weighted rate, a number >= 0",
        number(lambda v: v >= 0),
    ),
    "model": Key("model", "count only this model's tokens (the request's `model`)", _model, "all models"),
    "predictive": Key(
        "predictive",
        "true: answer max(demand now, the seasonal forecast of the next leadSeconds) while the "
        "forecast proves right; true or false",
        _boolean,
    ),
    "leadSeconds": Key(
        "lead_s",
        "how far ahead the forecast looks (a cold start and the time to act), 60 to 3600",
        whole(60, 3600),
    ),
    "maxForecastError": Key(
        "max_forecast_error",
        "the forecast is used only while its recent error (mean absolute / mean demand) is at "
        "most this, a number > 0",
        number(lambda v: v > 0),
    ),
    "kvCacheTarget": Key(
        "kv_cache_target",
        "ask for at least the replicas that bring the model servers' mean KV-cache use down to "
        "this fraction, a number in (0, 1]",
        number(lambda v: 0 < v <= 1),
        "none",
    ),
    "inFlightPerReplica": Key(
        "in_flight_per_replica",
        "ask for at least the replicas that bring the requests in flight (at the sidecars and "
        "held at gateways) down to this many per replica, a number > 0",
        number(lambda v: v > 0),
        "none",
    ),
    "maxReplicas": Key(
        "max_replicas",
        "the ScaledObject's maxReplicaCount (KEDA does not forward it), a whole number >= 0; 0 = unknown",
        whole(0, 100_000),
    ),
}

_DEFAULTS: dict[str, Any] = {f.name: f.default for f in fields(ScalerSettings)}


def _default_text(key: Key) -> str:
    if key.default_text is not None:
        return key.default_text
    value = _DEFAULTS[key.field]
    if isinstance(value, bool):
        return "true" if value else "false"
    return f"{value:g}" if isinstance(value, float) else str(value)


# key -> (one line for docs and errors, default shown in docs): derived from SPEC
KEYS: dict[str, tuple[str, str]] = {name: (key.help, _default_text(key)) for name, key in SPEC.items()}


def _expected(name: str) -> str:
    return "expected " + SPEC[name].help


def parse(metadata: Mapping[str, str], namespace: str, name: str) -> ScalerSettings:
    """Parse a trigger's metadata; raises ``MetadataError`` on the first bad key."""
    values: dict[str, Any] = {}
    for key, spec in SPEC.items():
        if key in metadata:
            values[spec.field] = spec.read(key, metadata[key])
    workload = values.get("workload") or f"{namespace}/{name}"
    try:
        validate_workload(workload)
    except ValueError as exc:
        raise MetadataError("workload", workload, str(exc)) from None
    values["workload"] = workload
    if "tokens_per_second_per_replica" not in values:
        raise MetadataError(
            "tokensPerSecondPerReplica", "", "required: " + KEYS["tokensPerSecondPerReplica"][0]
        )
    if values.get("prompt_weight", 1.0) == 0 and values.get("generation_weight", 1.0) == 0:
        raise MetadataError(
            "generationWeight",
            metadata.get("generationWeight", "1.0"),
            "promptWeight and generationWeight cannot both be 0",
        )
    window = values.get("window_s", _DEFAULTS["window_s"])
    if "panic_window_s" in values:
        values["panic_window_s"] = _whole(
            "panicWindowSeconds",
            metadata["panicWindowSeconds"],
            1,
            window // 2,
            f"expected a whole number from 1 to {window // 2} (half of windowSeconds={window})",
        )
    else:
        values["panic_window_s"] = min(_DEFAULTS["panic_window_s"], window // 2)
    return ScalerSettings(**values)


def settings_view(settings: ScalerSettings) -> dict[str, Any]:
    """The settings in force, by metadata key: what ``/debug/scalers`` shows."""
    return {key: getattr(settings, spec.field) for key, spec in SPEC.items()}
