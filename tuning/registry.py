"""The simulator's policies by name, each built from one calibration and a headroom.

Every policy is calibrated the same way: one replica's saturated throughput for the
trace's request mix (``capacity``, weighted tokens/s, what ``token-scaler profile``
measures on a real server), turned into each policy's own unit: requests/s by the
trace's mean weighted request, requests in flight by the replica's sequence slots. A
``headroom`` h divides every target alike (target = calibrated capacity / h), so a sweep
over h gives each policy the same room.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from scaler.metadata import ScalerSettings, parse
from token_scaler.errors import ConfigError, MetadataError
from tuning.policies import (
    ConcurrencyPolicy,
    ForesightPolicy,
    Policy,
    PrometheusRatePolicy,
    RequestRatePolicy,
    TokenPolicy,
)
from tuning.sweep import PANIC_OFF, burst_metadata
from tuning.trace import Trace

WORKLOAD = ("default", "llm")
MAX_HEADROOM = 10.0  # the scaler's highest headroom
Variant = Mapping[str, str]


@dataclass(frozen=True)
class Calibration:
    trace: Trace
    capacity: float  # weighted tokens/s of one saturated replica (tokensPerSecondPerReplica)
    prompt_weight: float
    generation_weight: float
    max_concurrency: int
    metadata: dict[str, str]  # the token policy's trigger metadata before a sweep changes it
    lookahead_s: int  # what the foresight bound sees ahead: cold start + time to act
    scrape_s: int = 15

    @property
    def per_request(self) -> float:
        mean_p, mean_g = self.trace.mean_tokens()
        return self.prompt_weight * mean_p + self.generation_weight * mean_g

    @property
    def requests_per_second(self) -> float:
        """One replica's capacity in requests/s of this trace's mean size."""
        return self.capacity / self.per_request

    def weighted_tokens(self) -> npt.NDArray[np.float64]:
        t = self.trace
        return self.prompt_weight * t.prompt + self.generation_weight * t.generated


def token_settings(metadata: Mapping[str, str]) -> ScalerSettings:
    try:
        return parse(dict(metadata), *WORKLOAD)
    except MetadataError as exc:
        raise ConfigError(f"--metadata: {exc}") from None


def token_metadata(cal: Calibration, headroom: float | None, variant: Variant) -> dict[str, str]:
    """The ScaledObject metadata of the token policy at ``headroom`` (None: as configured).
    The scaler takes headroom from 1 to 10; outside that the same target is written as
    ``tokensPerSecondPerReplica`` at headroom 1. The variant ``inflight: on`` adds the
    in-flight floor at the concurrency policy's target for the same headroom (the
    replica's sequence slots / h), so one headroom sets both."""
    metadata = {**cal.metadata}
    panic = variant.get("panic")
    for key, value in variant.items():
        if key == "burst":
            metadata.update(burst_metadata(value))
        elif key == "inflight":
            if value == "on":
                h = _default_headroom(cal, headroom)
                metadata["inFlightPerReplica"] = f"{cal.max_concurrency / h:.6g}"
        elif key != "panic":
            metadata[key] = value
    if panic is not None:
        if panic == "off":
            metadata.update(panicWindowSeconds="6", panicThreshold=f"{PANIC_OFF:g}")
        else:
            window, _, rest = panic.partition("@")
            threshold, _, hold = rest.partition("/")
            metadata.update(panicWindowSeconds=window, panicThreshold=threshold)
            if hold:
                metadata["panicHoldSeconds"] = hold
    if headroom is not None:
        if 1 <= headroom <= MAX_HEADROOM:
            metadata["headroom"] = f"{headroom:.4g}"
        else:
            metadata["headroom"] = "1"
            metadata["tokensPerSecondPerReplica"] = f"{cal.capacity / headroom:.6g}"
    return metadata


def _default_headroom(cal: Calibration, headroom: float | None) -> float:
    return token_settings(cal.metadata).headroom if headroom is None else headroom


def _token(cal: Calibration, headroom: float | None, variant: Variant) -> Policy:
    return TokenPolicy(token_settings(token_metadata(cal, headroom, variant)))


def _rps(cal: Calibration, headroom: float | None, variant: Variant) -> Policy:
    h = _default_headroom(cal, headroom)
    return RequestRatePolicy(cal.requests_per_second / h, int(variant.get("window", "60")))


def _concurrency(cal: Calibration, headroom: float | None, variant: Variant) -> Policy:
    return ConcurrencyPolicy(cal.max_concurrency / _default_headroom(cal, headroom))


def _prometheus(cal: Calibration, headroom: float | None, variant: Variant) -> Policy:
    h = _default_headroom(cal, headroom)
    return PrometheusRatePolicy(
        cal.capacity / h,
        cal.prompt_weight,
        cal.generation_weight,
        cal.scrape_s,
        int(variant.get("window", "60")),
    )


def _foresight(cal: Calibration, headroom: float | None, variant: Variant) -> Policy:
    h = _default_headroom(cal, headroom)
    return ForesightPolicy(cal.capacity / h, cal.trace.arrival_s, cal.weighted_tokens(), cal.lookahead_s)


def _foresight_requests(cal: Calibration, headroom: float | None, variant: Variant) -> Policy:
    h = _default_headroom(cal, headroom)
    ones = np.ones(len(cal.trace))
    policy = ForesightPolicy(
        cal.requests_per_second / h, cal.trace.arrival_s, ones, cal.lookahead_s, unit="requests/s"
    )
    policy.name = "foresight-requests"
    return policy


Factory = Callable[[Calibration, "float | None", Variant], Policy]

POLICIES: dict[str, tuple[Factory, str]] = {
    "token": (_token, "this project's scaler: weighted tokens/s from the sidecars' records"),
    "rps": (_rps, "requests/s arriving (KEDA HTTP add-on requestRate)"),
    "concurrency": (_concurrency, "requests in flight (KEDA HTTP add-on concurrency)"),
    "prometheus": (_prometheus, "rate() of the model servers' served tokens (KEDA prometheus scaler)"),
    "foresight": (_foresight, "bound: knows the weighted token demand of the next cold start"),
    "foresight-requests": (_foresight_requests, "bound: knows the request rate of the next cold start"),
}
RUNNABLE = ("token", "rps", "concurrency", "prometheus")  # what a cluster can run
BOUNDS = ("foresight", "foresight-requests")


def make(
    name: str, cal: Calibration, headroom: float | None = None, variant: Variant | None = None
) -> Policy:
    """The policy ``name`` at ``headroom`` (None: the configured one); KeyError names the choices."""
    try:
        factory, _ = POLICIES[name]
    except KeyError:
        raise KeyError(f"unknown policy {name!r}; expected one of {', '.join(POLICIES)}") from None
    return factory(cal, headroom, variant or {})
