"""Predictive pre-scaling: a seasonal forecast of a workload's demand, pure (no I/O).

History. Per whole minute (Unix seconds // 60) the workload's token counts of that
minute: served and arrived prompt and generation tokens, as the stream's entries say
(``MinuteCounts``). A ScaledObject weighs them with its own weights, so one history
serves every ScaledObject of a workload. The scaler keeps the last ``HISTORY_DAYS`` in
Redis (``scaler/history.py``), so it survives restarts and every scaler replica reads
the same; the simulator keeps it in memory (``tuning/policies.py``). Both forecast with
``forecast`` below.

Forecast (seasonal naive, scaled to the recent level). The demand expected over the
next ``lead`` seconds is the highest minute of the same stretch one season ago (a week
when the history holds that minute, else a day), times the level ratio: the demand of
the last ``LEVEL_MINUTES`` over the same minutes one season ago (clamped to
``LEVEL_CLAMP``): a Tuesday that runs 20 % above last Tuesday is expected to go on
doing so. Taking the highest minute of the lead stretch, not the one at its end, keeps
replicas for a peak that comes and goes inside it.

Trust. Every minute the forecast that would have been made ``lead`` earlier for that
minute is compared with what came: the error is the mean absolute error over the last
``ERROR_MINUTES`` minutes, relative to their mean demand, or to one replica's target
when the demand was below that (``floor``): a miss of a few tokens/s at night is no
miss that costs a replica, and a workload idle at zero, as it was a day ago, is
forecast right, so the forecast can wake it before its morning ramp. While the error is
above ``maxForecastError`` (or the history lacks a season), the forecast is not trusted
and the scaler answers reactively: a forecast that keeps missing turns itself off.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from scaler.demand import DEFAULT_MARGIN, demand_of

MINUTE_S = 60
DAY_MIN = 24 * 60
WEEK_MIN = 7 * DAY_MIN
HISTORY_DAYS = 8
LEVEL_MINUTES = 30
LEVEL_CLAMP = (0.5, 2.0)
ERROR_MINUTES = 60


@dataclass(frozen=True)
class MinuteCounts:
    """Tokens counted in one minute: served prompt/generation, arrived prompt/generation, and
    the requests that arrived (None where unknown: ``scaler/history.py``)."""

    served_prompt: float
    served_generation: float
    arrived_prompt: float
    arrived_generation: float
    arrived_requests: float | None = None

    def demand(self, pw: float, gw: float, margin: float = DEFAULT_MARGIN) -> float:
        """Weighted tokens per second over the minute, chosen as the window's (``scaler.demand``)."""
        served = pw * self.served_prompt + gw * self.served_generation
        arrived = pw * self.arrived_prompt + gw * self.arrived_generation
        return demand_of(served, arrived, margin) / MINUTE_S

    def encode(self) -> str:
        values: tuple[float, ...] = self.as_tuple()
        if self.arrived_requests is not None:
            values += (self.arrived_requests,)
        return ",".join(f"{v:.0f}" for v in values)

    def as_tuple(self) -> tuple[float, float, float, float]:
        return (self.served_prompt, self.served_generation, self.arrived_prompt, self.arrived_generation)

    @classmethod
    def decode(cls, raw: str) -> MinuteCounts:
        """Raises ValueError naming the value when its four token counts are not numbers
        >= 0; a fifth value that is not a count >= 0 reads as arrivals unknown."""
        parts = raw.split(",")
        if len(parts) not in (4, 5):
            raise ValueError(f"expected 4 or 5 comma-separated numbers, got {raw!r}")
        try:
            values = [float(p) for p in parts[:4]]
        except ValueError:
            raise ValueError(f"expected numbers >= 0, got {raw!r}") from None
        if not all(math.isfinite(v) and v >= 0 for v in values):
            raise ValueError(f"expected numbers >= 0, got {raw!r}")
        sp, sg, ap, ag = values
        return cls(sp, sg, ap, ag, _arrivals(parts[4]) if len(parts) == 5 else None)


def _arrivals(raw: str) -> float | None:
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


@dataclass(frozen=True)
class Forecast:
    value: float  # expected weighted tokens/s over the lead (0 without a forecast)
    season: str  # "week", "day" or "none"
    level: float  # the recent level over the same minutes one season ago
    error: float | None  # recent relative mean absolute error, None when not measurable
    trusted: bool
    reason: str


@dataclass(frozen=True)
class Weighing:
    """How a minute's counts become its demand: the weights and ``arrivalMargin``."""

    pw: float
    gw: float
    margin: float = DEFAULT_MARGIN

    def __call__(self, counts: MinuteCounts) -> float:
        return counts.demand(self.pw, self.gw, self.margin)


class MinuteDemands:
    """The demand of each minute of a history, weighed once: a forecast reads most minutes
    of its last hours many times (``recent_error`` checks sixty forecasts, each with two
    30-minute levels)."""

    def __init__(self, history: Mapping[int, MinuteCounts], weigh: Weighing) -> None:
        self.history = history
        self.weigh = weigh
        self._seen: dict[int, float] = {}

    def __contains__(self, minute: int) -> bool:
        return minute in self.history

    def __getitem__(self, minute: int) -> float:
        demand = self._seen.get(minute)
        if demand is None:
            demand = self._seen[minute] = self.weigh(self.history[minute])
        return demand

    def of(self, minutes: Iterable[int]) -> list[float]:
        """The demands of those of ``minutes`` the history holds, in their order."""
        return [self[m] for m in minutes if m in self.history]


def _season(history: Mapping[int, MinuteCounts], minute: int) -> int | None:
    """The longest season whose minute one season before ``minute`` is in the history."""
    for season in (WEEK_MIN, DAY_MIN):
        if minute - season in history:
            return season
    return None


def _level(demands: MinuteDemands, now_min: int, season: int) -> float:
    recent = demands.of(range(now_min - LEVEL_MINUTES, now_min))
    before = demands.of(range(now_min - LEVEL_MINUTES - season, now_min - season))
    if not recent or not before or sum(before) <= 0:
        return 1.0
    ratio = (sum(recent) / len(recent)) / (sum(before) / len(before))
    return min(max(ratio, LEVEL_CLAMP[0]), LEVEL_CLAMP[1])


def predict(demands: MinuteDemands, now_min: int, lead_min: int) -> tuple[float, str, float]:
    """(expected demand over minutes now..now+lead, season used, level); 0 and "none" when
    the history has no season for them."""
    season = _season(demands.history, now_min + lead_min)
    if season is None:
        return 0.0, "none", 1.0
    past = demands.of(range(now_min - season, now_min + lead_min + 1 - season))
    if not past:
        return 0.0, "none", 1.0
    level = _level(demands, now_min, season)
    return max(past) * level, "week" if season == WEEK_MIN else "day", level


def recent_error(demands: MinuteDemands, now_min: int, lead_min: int, floor: float = 0.0) -> float | None:
    """Mean absolute error, over the last ``ERROR_MINUTES``, of what ``predict`` would have
    said ``lead`` minutes before each minute (for that minute alone), relative to the mean
    demand or ``floor`` (weighted tokens/s), whichever is higher; 0 when both are 0 and
    nothing was missed."""
    errors, actuals = [], []
    for m in range(now_min - ERROR_MINUTES, now_min):
        if m not in demands:
            continue
        season = _season(demands.history, m)
        if season is None:
            continue
        actual = demands[m]
        expected = demands[m - season] * _level(demands, m - lead_min, season)
        errors.append(abs(expected - actual))
        actuals.append(actual)
    if len(actuals) < ERROR_MINUTES // 2:
        return None
    scale = max(sum(actuals), floor * len(actuals))
    if scale <= 0:
        return 0.0 if sum(errors) == 0 else None
    return sum(errors) / scale


def forecast(
    history: Mapping[int, MinuteCounts],
    now_s: float,
    lead_s: int,
    pw: float,
    gw: float,
    max_error: float,
    floor: float = 0.0,
    margin: float = DEFAULT_MARGIN,
) -> Forecast:
    """The forecast at ``now_s`` (Redis time) for the next ``lead_s`` seconds; errors are
    relative to the demand or ``floor``, whichever is higher (``recent_error``); each minute's
    demand is chosen with ``margin`` as the window's (``arrivalMargin``)."""
    now_min = int(now_s // MINUTE_S)
    lead_min = max(1, math.ceil(lead_s / MINUTE_S))
    demands = MinuteDemands(history, Weighing(pw, gw, margin))
    value, season, level = predict(demands, now_min, lead_min)
    error = recent_error(demands, now_min, lead_min, floor)
    if season == "none":
        return Forecast(
            0.0, season, 1.0, error, False, "no forecast: the history holds no day or week before"
        )
    if error is None:
        return Forecast(value, season, level, None, False, "not trusted yet: under 30 minutes to check it on")
    trusted = error <= max_error
    reason = (
        f"same minutes one {season} ago x {level:.2f} (recent level); recent error {100 * error:.0f} %"
        + ("" if trusted else f" > {100 * max_error:.0f} %: not trusted, answering reactively")
    )
    return Forecast(value, season, level, error, trusted, reason)
