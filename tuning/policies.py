"""What each scaling policy reports to the HPA: a workload-wide value and a per-replica target
(KEDA's ``AverageValue``: the HPA asks for ``ceil(value / target)`` replicas).

* ``token``: this project's scaler. Every second each running pod's sidecar flushes a
  stream ``Record``; the policy adds them to a ``WorkloadSeries`` under the entry id
  ``"<ms>-0"`` and answers with ``scaler.window.evaluate`` -- the code ``token-scaler
  serve`` runs, not a copy.
* ``rps``: requests/s arriving over a rolling window (KEDA HTTP add-on ``requestRate``,
  1 s buckets).
* ``concurrency``: requests in flight (queued or being served) when the HPA asks (KEDA
  HTTP add-on ``concurrency``).
* ``prometheus``: ``sum(rate(prompt_tokens_total[W])) * pw + sum(rate(generation_tokens_total[W])) * gw``
  over the model servers' own served-token counters, scraped every ``scrape_s``: the
  KEDA ``prometheus`` scaler path, stale by the scrape interval plus the rate window, and
  blind to tokens waiting in queues.
* ``foresight``: not a policy anyone can run, a bound: it knows the trace. Its value at
  ``t`` is the highest demand (weighted tokens, or requests, arriving per second, as a
  mean over ``smooth_s``) in ``[t, t + lookahead_s]``, with the lookahead a cold start
  plus the time the HPA and KEDA take to act, so pods are ready before the demand they
  serve arrives. Through the same HPA as every policy, it shows how close a perfect
  signal gets: each policy's distance to it is what better signals could still win.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from scaler.config import ScalerConfig
from scaler.forecast import MINUTE_S, Forecast, MinuteCounts
from scaler.history import SETTLE_S
from scaler.metadata import ScalerSettings
from scaler.predictive import combine, forecast_for
from scaler.pressure import apply_floor, pressure
from scaler.series import Flushes, WorkloadSeries
from scaler.size import Size, request_size
from scaler.window import Evaluation, evaluate
from token_scaler.record import Record


@dataclass
class Second:
    """What happened in the second that ends at ``t`` (whole seconds since the start)."""

    t: int
    arrivals: int
    served_prompt: float
    served_generation: float
    records: list[Record]
    # the sidecars' records, in the form the series takes without building them (applied
    # before ``records``)
    flushes: Flushes | None = None


class Policy:
    name = "policy"
    needs_records = False

    def __init__(self, target: float) -> None:
        if not target > 0:
            raise ValueError(f"{self.name}: the per-replica target must be above 0")
        self.target = target

    def observe(self, second: Second) -> None:
        """Called once a second, after the sidecars flushed."""

    def value(self, now_s: float, in_flight: int) -> float:
        raise NotImplementedError

    def active(self, now_s: float, in_flight: int) -> bool:
        """KEDA's IsActive, used only to scale from zero."""
        return self.value(now_s, in_flight) > 0

    def describe(self) -> str:
        return f"target {self.target:g}/replica"


LIVENESS_MS = int(ScalerConfig.liveness_s * 1000)  # the scaler's default --sidecar-liveness


class TokenPolicy(Policy):
    """The scaler's answer from the records the simulated sidecars flush. With
    ``inFlightPerReplica`` it has the scaler's in-flight floor (``scaler.pressure``) from the
    gauges of those records. With ``predictive`` settings the minutes of the series go into a
    history kept in memory and the answer is ``scaler.predictive.combine``d with
    ``forecast_for`` it, as the scaler does with the history it keeps in Redis; with
    ``sizeWindowSeconds`` the size of the arriving requests is measured on that history
    (``scaler.size``)."""

    name = "token"
    needs_records = True

    def __init__(self, settings: ScalerSettings) -> None:
        super().__init__(settings.target)
        self.settings = settings
        self.series = WorkloadSeries()
        self.last_rule = ""
        self.history: dict[int, MinuteCounts] = {}
        self.forecast: tuple[int, Forecast] | None = None
        self.size: tuple[int, Size | None] | None = None  # (minute, the size then)
        self.keeps_history = settings.predictive or settings.size_window_s > 0
        self.observed = 0  # seconds observed: what an evaluation depends on besides the time
        self.last: tuple[int, int, Evaluation] | None = None  # (now ms, observed, answer)

    def observe(self, second: Second) -> None:
        self.observed += 1
        if second.flushes is not None:
            self.series.add_flushes(second.flushes, second.t * 1000)
        if second.records:
            self.series.add_all(second.records, f"{second.t * 1000}-0")
        if self.keeps_history and second.t % MINUTE_S == SETTLE_S:
            counts = self.series.minute_counts(second.t // MINUTE_S - 1, self.settings.model)
            if counts is not None:
                self.history[second.t // MINUTE_S - 1] = counts

    def _evaluate(self, now_s: float) -> Evaluation:
        """The scaler's answer at ``now_s``; asked again at the same instant with nothing
        observed in between (the HPA's value and KEDA's activation), the same answer."""
        now_ms = int(now_s * 1000)
        if self.last is not None and self.last[:2] == (now_ms, self.observed):
            return self.last[2]
        minute = now_ms // 1000 // MINUTE_S
        size = None
        if self.settings.size_window_s:
            if self.size is None or self.size[0] != minute:
                self.size = (minute, request_size(self.history, now_ms / 1000, self.settings))
            size = self.size[1]
        result = evaluate(self.series, self.settings, now_ms, size)
        if self.settings.predictive:
            if self.forecast is None or self.forecast[0] != minute:
                self.forecast = (minute, forecast_for(self.history, self.settings, now_ms))
            result = combine(result, self.forecast[1], self.settings)
        if self.settings.in_flight_per_replica is not None:
            writers = self.series.live_writers(now_ms, LIVENESS_MS)
            result = apply_floor(result, pressure(writers, self.settings.model), self.settings)
        self.last = (now_ms, self.observed, result)
        return result

    def value(self, now_s: float, in_flight: int) -> float:
        result = self._evaluate(now_s)
        self.last_rule = result.rule
        return result.value

    def active(self, now_s: float, in_flight: int) -> bool:
        return self._evaluate(now_s).active

    def describe(self) -> str:
        s = self.settings
        return (
            f"tokensPerSecondPerReplica={s.tokens_per_second_per_replica:g} headroom={s.headroom:g} "
            f"window={s.window_s}s panic={s.panic_window_s}s@{s.panic_threshold:g}x "
            f"weights={s.prompt_weight:g}/{s.generation_weight:g}"
            + (f" predictive lead={s.lead_s}s" if s.predictive else "")
            + (f" size={s.size_window_s}s" if s.size_window_s else "")
        )


class RequestRatePolicy(Policy):
    name = "rps"

    def __init__(self, target: float, window_s: int = 60) -> None:
        super().__init__(target)
        self.window_s = window_s
        self.counts: deque[int] = deque(maxlen=window_s)
        self.seconds = 0

    def observe(self, second: Second) -> None:
        self.counts.append(second.arrivals)
        self.seconds += 1

    def value(self, now_s: float, in_flight: int) -> float:
        covered = min(self.seconds, self.window_s)
        return sum(self.counts) / covered if covered else 0.0

    def describe(self) -> str:
        return f"{self.target:.3g} req/s per replica, {self.window_s}s window"


class ConcurrencyPolicy(Policy):
    name = "concurrency"

    def value(self, now_s: float, in_flight: int) -> float:
        return float(in_flight)

    def describe(self) -> str:
        return f"{self.target:.3g} requests in flight per replica"


class FixedPolicy(Policy):
    """No autoscaling: ``replicas`` pods all along (run with min = max = initial = replicas).
    The reference every autoscaler must beat: it pays for the peak and never waits for a cold start."""

    name = "fixed"

    def __init__(self, replicas: int) -> None:
        super().__init__(1.0)
        self.replicas = replicas

    def value(self, now_s: float, in_flight: int) -> float:
        return float(self.replicas)

    def describe(self) -> str:
        return f"{self.replicas} replicas all along (no autoscaling)"


@dataclass
class _Scrapes:
    times: deque[float] = field(default_factory=deque)
    values: deque[float] = field(default_factory=deque)


class PrometheusRatePolicy(Policy):
    name = "prometheus"

    def __init__(
        self,
        target: float,
        prompt_weight: float = 1.0,
        generation_weight: float = 1.0,
        scrape_s: int = 15,
        rate_window_s: int = 60,
    ) -> None:
        super().__init__(target)
        self.pw, self.gw = prompt_weight, generation_weight
        self.scrape_s, self.rate_window_s = scrape_s, rate_window_s
        self.total = 0.0
        self.scrapes = _Scrapes()

    def observe(self, second: Second) -> None:
        self.total += self.pw * second.served_prompt + self.gw * second.served_generation
        if second.t % self.scrape_s == 0:
            self.scrapes.times.append(float(second.t))
            self.scrapes.values.append(self.total)
            while (
                self.scrapes.times and self.scrapes.times[0] < second.t - self.rate_window_s - self.scrape_s
            ):
                self.scrapes.times.popleft()
                self.scrapes.values.popleft()

    def value(self, now_s: float, in_flight: int) -> float:
        inside = [
            (t, v)
            for t, v in zip(self.scrapes.times, self.scrapes.values, strict=True)
            if now_s - self.rate_window_s < t <= now_s
        ]
        if len(inside) < 2:
            return 0.0
        (t0, v0), (t1, v1) = inside[0], inside[-1]
        return max(0.0, (v1 - v0) / (t1 - t0)) if t1 > t0 else 0.0

    def describe(self) -> str:
        return (
            f"target {self.target:.4g} tokens/s per replica, scrape {self.scrape_s}s, "
            f"rate[{self.rate_window_s}s]"
        )


def forward_max(values: npt.NDArray[np.float64], width: int) -> npt.NDArray[np.float64]:
    """``out[i] = max(values[i : i + width])`` (shorter at the end), in log2(width) passes."""
    n = len(values)
    if width <= 1 or n == 0:
        return values.copy()
    m = np.concatenate([values, np.full(width, -np.inf)])
    span = 1
    while 2 * span <= width:
        m = np.maximum(m[: len(m) - span], m[span:])
        span *= 2
    # m[i] = max over [i, i + span); two such windows cover [i, i + width)
    out: npt.NDArray[np.float64] = np.maximum(m[:n], m[width - span : width - span + n])
    return out


class ForesightPolicy(Policy):
    """The foresight bound: knows the demand ``lookahead_s`` ahead (see the module docstring)."""

    name = "foresight"

    def __init__(
        self,
        target: float,
        arrival_s: npt.NDArray[np.float64],
        weight: npt.NDArray[np.float64],
        lookahead_s: int,
        smooth_s: int = 30,
        unit: str = "weighted tokens/s",
    ) -> None:
        super().__init__(target)
        self.lookahead_s, self.smooth_s, self.unit = lookahead_s, smooth_s, unit
        seconds = np.floor(arrival_s).astype(np.int64)
        size = int(seconds[-1]) + 1 if len(seconds) else 1
        per_second = np.bincount(seconds, weights=weight, minlength=size).astype(np.float64)
        # the mean over [t, t + smooth_s): what a replica's capacity must absorb
        cum = np.concatenate([[0.0], np.cumsum(per_second), np.zeros(smooth_s)])
        cum[size + 1 :] = cum[size]
        mean = (cum[smooth_s : smooth_s + size] - cum[:size]) / smooth_s
        self.values = forward_max(mean, lookahead_s + 1)

    def value(self, now_s: float, in_flight: int) -> float:
        i = int(now_s)
        return float(self.values[i]) if 0 <= i < len(self.values) else 0.0

    def describe(self) -> str:
        return (
            f"target {self.target:.4g} {self.unit} per replica, the highest {self.smooth_s}s mean "
            f"demand of the next {self.lookahead_s}s, known exactly"
        )
