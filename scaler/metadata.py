"""ScaledObject trigger metadata -> typed settings.

KEDA forwards the whole trigger metadata map (its own keys such as ``scalerAddress``
included), so unknown keys are ignored. A key that is present with a bad value is an
error naming the key, the value and what is allowed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from token_scaler.errors import MetadataError
from token_scaler.record import validate_workload

MAX_WINDOW_S = 600
# The burst envelope looks back at most as far as the sidecars' streams keep entries by
# default (token_scaler.record.DEFAULT_RETENTION_S), so a scaler that starts or restarts
# backfills every second it reads and replicas agree.
BURST_LOOKBACK_MAX_S = 2 * MAX_WINDOW_S
BURST_WINDOW_MAX_S = 60


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
    burst_window_s: int = 0  # 0: no burst envelope
    burst_quantile: float = 0.9
    burst_lookback_s: int = BURST_LOOKBACK_MAX_S

    @property
    def target(self) -> float:
        """Per-replica target KEDA's HPA divides the workload's value by."""
        return self.tokens_per_second_per_replica / self.headroom


# key -> (one line for docs and errors, default shown in docs)
KEYS: dict[str, tuple[str, str]] = {
    "workload": (
        "whose sidecar streams to read, <namespace>/<name>",
        "<namespace>/<name> of the ScaledObject",
    ),
    "tokensPerSecondPerReplica": ("weighted tokens/s one replica serves, a number > 0", "required"),
    "headroom": ("buffer factor, target = tokensPerSecondPerReplica / headroom, from 1 to 10", "1.3"),
    "windowSeconds": ("stable rolling window in seconds, a whole number from 10 to 600", "60"),
    "promptWeight": ("weight of prompt tokens, a number >= 0", "1.0"),
    "generationWeight": ("weight of generated tokens, a number >= 0", "1.0"),
    "panicWindowSeconds": ("short burst window in seconds, a whole number from 1 to half the window", "6"),
    "panicThreshold": (
        "panic when the short window asks for >= this x the replicas reporting now, a number > 1",
        "2.0",
    ),
    "panicHoldSeconds": (
        "panic ends this long after its last trigger, a whole number from 1 to 600",
        "15",
    ),
    "burstWindowSeconds": (
        "size capacity for bursts too: answer at least the burstQuantile of the demand of every "
        "window of this many seconds in the last burstLookbackSeconds; 0 (off) or a whole number "
        f"from 1 to {BURST_WINDOW_MAX_S}",
        "0",
    ),
    "burstQuantile": ("which quantile of the burst windows' demand, a number in (0, 1]", "0.9"),
    "burstLookbackSeconds": (
        f"how far back the burst windows reach, a whole number from 60 to {BURST_LOOKBACK_MAX_S} "
        "(at most the sidecars' stream retention)",
        str(BURST_LOOKBACK_MAX_S),
    ),
    "activationTokensPerSecond": ("IsActive is true above this weighted rate, a number >= 0", "0"),
    "model": ("count only this model's tokens (the request's `model`)", "all models"),
    "predictive": (
        "true: answer max(demand now, the seasonal forecast of the next leadSeconds) while the "
        "forecast proves right; true or false",
        "false",
    ),
    "leadSeconds": (
        "how far ahead the forecast looks (a cold start and the time to act), 60 to 3600",
        "300",
    ),
    "maxForecastError": (
        "the forecast is used only while its recent error (mean absolute / mean demand) is at "
        "most this, a number > 0",
        "0.3",
    ),
    "kvCacheTarget": (
        "ask for at least the replicas that bring the model servers' mean KV-cache use down to "
        "this fraction, a number in (0, 1]",
        "none",
    ),
    "maxReplicas": (
        "the ScaledObject's maxReplicaCount (KEDA does not forward it), a whole number >= 0; 0 = unknown",
        "0",
    ),
}


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


def parse(metadata: Mapping[str, str], namespace: str, name: str) -> ScalerSettings:
    """Parse a trigger's metadata; raises ``MetadataError`` on the first bad key."""

    def allowed(key: str) -> str:
        return "expected " + KEYS[key][0]

    workload = metadata.get("workload") or f"{namespace}/{name}"
    try:
        validate_workload(workload)
    except ValueError as exc:
        raise MetadataError("workload", workload, str(exc)) from None

    raw_capacity = metadata.get("tokensPerSecondPerReplica")
    if raw_capacity is None:
        raise MetadataError(
            "tokensPerSecondPerReplica", "", "required: " + KEYS["tokensPerSecondPerReplica"][0]
        )
    capacity = _number(
        "tokensPerSecondPerReplica", raw_capacity, lambda v: v > 0, allowed("tokensPerSecondPerReplica")
    )

    def number(key: str, default: float, ok: Callable[[float], bool]) -> float:
        raw = metadata.get(key)
        return default if raw is None else _number(key, raw, ok, allowed(key))

    headroom = number("headroom", 1.3, lambda v: 1 <= v <= 10)
    window = 60
    if "windowSeconds" in metadata:
        window = _whole(
            "windowSeconds", metadata["windowSeconds"], 10, MAX_WINDOW_S, allowed("windowSeconds")
        )
    prompt_weight = number("promptWeight", 1.0, lambda v: v >= 0)
    generation_weight = number("generationWeight", 1.0, lambda v: v >= 0)
    if prompt_weight == 0 and generation_weight == 0:
        raise MetadataError(
            "generationWeight",
            metadata.get("generationWeight", "1.0"),
            "promptWeight and generationWeight cannot both be 0",
        )
    panic_window = 6
    if "panicWindowSeconds" in metadata:
        panic_window = _whole(
            "panicWindowSeconds",
            metadata["panicWindowSeconds"],
            1,
            window // 2,
            f"expected a whole number from 1 to {window // 2} (half of windowSeconds={window})",
        )
    elif panic_window > window // 2:
        panic_window = window // 2
    panic_threshold = number("panicThreshold", 2.0, lambda v: v > 1)
    panic_hold = 15
    if "panicHoldSeconds" in metadata:
        panic_hold = _whole(
            "panicHoldSeconds", metadata["panicHoldSeconds"], 1, MAX_WINDOW_S, allowed("panicHoldSeconds")
        )
    burst_window = 0
    if "burstWindowSeconds" in metadata:
        burst_window = _whole(
            "burstWindowSeconds",
            metadata["burstWindowSeconds"],
            0,
            BURST_WINDOW_MAX_S,
            allowed("burstWindowSeconds"),
        )
    burst_quantile = number("burstQuantile", 0.9, lambda v: 0 < v <= 1)
    burst_lookback = BURST_LOOKBACK_MAX_S
    if "burstLookbackSeconds" in metadata:
        burst_lookback = _whole(
            "burstLookbackSeconds",
            metadata["burstLookbackSeconds"],
            60,
            BURST_LOOKBACK_MAX_S,
            allowed("burstLookbackSeconds"),
        )
    activation = number("activationTokensPerSecond", 0.0, lambda v: v >= 0)
    max_replicas = 0
    if "maxReplicas" in metadata:
        max_replicas = _whole("maxReplicas", metadata["maxReplicas"], 0, 100_000, allowed("maxReplicas"))
    predictive = False
    if "predictive" in metadata:
        raw = metadata["predictive"].strip().lower()
        if raw not in ("true", "false"):
            raise MetadataError("predictive", metadata["predictive"], allowed("predictive"))
        predictive = raw == "true"
    lead = 300
    if "leadSeconds" in metadata:
        lead = _whole("leadSeconds", metadata["leadSeconds"], 60, 3600, allowed("leadSeconds"))
    max_error = number("maxForecastError", 0.3, lambda v: v > 0)
    kv_target = None
    if "kvCacheTarget" in metadata:
        kv_target = number("kvCacheTarget", 0.8, lambda v: 0 < v <= 1)
    model = metadata.get("model")
    if model is not None and not model.strip():
        raise MetadataError("model", model, "expected a model name (leave the key out to count all models)")
    return ScalerSettings(
        workload=workload,
        tokens_per_second_per_replica=capacity,
        headroom=headroom,
        window_s=window,
        prompt_weight=prompt_weight,
        generation_weight=generation_weight,
        panic_window_s=panic_window,
        panic_threshold=panic_threshold,
        panic_hold_s=panic_hold,
        activation_tokens_per_second=activation,
        model=model,
        max_replicas=max_replicas,
        predictive=predictive,
        lead_s=lead,
        max_forecast_error=max_error,
        kv_cache_target=kv_target,
        burst_window_s=burst_window,
        burst_quantile=burst_quantile,
        burst_lookback_s=burst_lookback,
    )
