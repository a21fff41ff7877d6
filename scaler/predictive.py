"""Predictive answers: the reactive evaluation raised to the forecast while it is trusted.

The forecast and its trust are ``scaler/forecast.py``'s; the history lives in Redis
(``scaler/history.py``). The simulator applies the same ``combine`` to the same
``forecast`` over a history kept in memory, so what it shows is what the scaler does.
"""

from __future__ import annotations

from dataclasses import replace

from scaler.forecast import MINUTE_S, Forecast, MinuteCounts, forecast
from scaler.history import HistoryStore
from scaler.metadata import ScalerSettings
from scaler.window import Evaluation, replicas_for


def combine(evaluation: Evaluation, fc: Forecast, settings: ScalerSettings) -> Evaluation:
    """``max(demand now, forecast)`` while the forecast is trusted; the reason says which."""
    if not fc.trusted or fc.value <= evaluation.value:
        note = f"; forecast {fc.value:.1f} tokens/s ({fc.reason})"
        return replace(evaluation, reason=evaluation.reason + note)
    return replace(
        evaluation,
        value=fc.value,
        replicas=replicas_for(fc.value, evaluation.target),
        active=fc.value > settings.activation_tokens_per_second,
        rule="forecast",
        reason=(
            f"forecast {fc.value:.1f} weighted tokens/s over the next {settings.lead_s}s is above "
            f"the demand now ({evaluation.value:.1f}): {fc.reason}"
        ),
    )


def forecast_for(history: dict[int, MinuteCounts], settings: ScalerSettings, now_ms: int) -> Forecast:
    return forecast(
        history,
        now_ms / 1000,
        settings.lead_s,
        settings.prompt_weight,
        settings.generation_weight,
        settings.max_forecast_error,
        settings.target,
        settings.arrival_margin,
    )


class Predictor:
    """Forecasts per ScaledObject settings, computed once a minute (the history's grain)."""

    def __init__(self, store: HistoryStore) -> None:
        self.store = store
        self._cache: dict[ScalerSettings, tuple[int, Forecast]] = {}

    async def forecast(self, settings: ScalerSettings, now_ms: int) -> Forecast:
        minute = now_ms // 1000 // MINUTE_S
        cached = self._cache.get(settings)
        if cached is not None and cached[0] == minute:
            return cached[1]
        history = await self.store.load(settings.workload, now_ms / 1000)
        fc = forecast_for(history.of(settings.model), settings, now_ms)
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[settings] = (minute, fc)
        return fc

    def forget(self, settings: ScalerSettings) -> None:
        self._cache.pop(settings, None)
