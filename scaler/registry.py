"""The ScaledObjects the scaler has been asked about, and what it answered them.

Transport-free: the gRPC service and the debug endpoint both go through here.
Evaluations are cached per (workload, settings) for one Redis second and one
state of the series, so a burst of calls costs one evaluation, and every call in
the same second with the same data gets the same answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from scaler import view
from scaler.ceiling import bound_answer
from scaler.cost import describe_cost, series_cost
from scaler.forecast import Forecast
from scaler.history import HistoryStore
from scaler.metadata import ScalerSettings, parse, settings_view
from scaler.metrics import ScalerMetrics
from scaler.namespaces import OWN_NAMESPACE, NamespaceAccess
from scaler.predictive import Predictor, combine
from scaler.pressure import apply_floor, pressure
from scaler.reader import StreamReader
from scaler.size import Size, request_size
from scaler.window import Evaluation, evaluate
from token_scaler.errors import MetadataError
from token_scaler.pricing import PriceTable
from token_scaler.saturation import DEMAND, MAX_REPLICAS, Saturation

METRIC_NAME = "token-demand"
# The stable window is queueing while tokens arrive more than this many times faster than they
# are served (docs/scaler.md). Strictly more, and never while nothing is served: unlike
# scaler.demand.arrivals_lead, whose ">=" and served == 0 case choose the demand, not a signal.
QUEUEING_RATIO = 1.1


@dataclass
class ScaledObjectState:
    namespace: str
    name: str
    metadata: dict[str, str]
    settings: ScalerSettings
    first_asked: float = field(default_factory=time.time)
    last_asked: dict[str, float] = field(default_factory=dict)
    last_value: float | None = None
    last_active: bool | None = None
    last_evaluation: Evaluation | None = None
    # the evaluation the per-ScaledObject gauges show; most calls repeat it (one per second)
    gauged: Evaluation | None = None
    last_forecast: Forecast | None = None
    last_size: Size | None = None  # the arriving requests' size the last evaluation used


def refuse_history(settings: ScalerSettings) -> None:
    """Raises ``MetadataError`` for settings that read a minute history a scaler keeps none of."""
    allowed = "this scaler keeps no per-minute history to read it from"
    if settings.predictive:
        raise MetadataError("predictive", "true", f"{allowed}; leave it out or set it to false")
    if settings.size_window_s:
        raise MetadataError(
            "sizeWindowSeconds", str(settings.size_window_s), f"{allowed}; leave it out or set 0"
        )


class Registry:
    def __init__(
        self,
        reader: StreamReader,
        metrics: ScalerMetrics,
        prices: PriceTable | None = None,
        history: HistoryStore | None = None,
        access: NamespaceAccess = OWN_NAMESPACE,
    ) -> None:
        """``history``: the per-minute history in Redis that forecasts (``predictive``) and
        the arriving requests' size (``sizeWindowSeconds``) read; without it, a ScaledObject
        asking for either is refused."""
        self.reader = reader
        self.access = access
        self.metrics = metrics
        self.prices = prices
        self.history = history
        self.predictor = Predictor(history) if history is not None else None
        self.objects: dict[tuple[str, str], ScaledObjectState] = {}
        self._parsed: dict[tuple[str, str, frozenset[tuple[str, str]]], ScalerSettings] = {}
        # (second, series version, the demand's evaluation, the answer: bound_answer of it,
        # forecast, the arriving requests' size)
        self._cache: dict[
            tuple[str, ScalerSettings],
            tuple[int, int, Evaluation, Evaluation, Forecast | None, Size | None],
        ] = {}

    def resolve(
        self, namespace: str, name: str, metadata: Mapping[str, str], method: str
    ) -> ScaledObjectState:
        """Settings for this call's metadata (raises ``MetadataError``); records the call."""
        items = frozenset(metadata.items())
        key = (namespace, name, items)
        settings = self._parsed.get(key)
        if settings is None:
            settings = parse(metadata, namespace, name)
            if not self.access.allows(namespace, settings.workload):
                raise MetadataError("workload", settings.workload, self.access.refusal(namespace))
            if self.history is None:
                refuse_history(settings)
            if len(self._parsed) > 10_000:
                self._parsed.clear()
            self._parsed[key] = settings
        state = self.objects.get((namespace, name))
        if state is None or state.settings != settings:
            state = ScaledObjectState(namespace, name, dict(metadata), settings)
            self.objects[(namespace, name)] = state
            self.reader.ceiling.watch(namespace, name, settings)
        state.last_asked[method] = time.time()
        return state

    async def evaluate(self, state: ScaledObjectState) -> Evaluation:
        """The current answer; raises ``RedisUnavailable`` when the data cannot be trusted."""
        return (await self._evaluations(state))[1]

    async def _evaluations(self, state: ScaledObjectState) -> tuple[Evaluation, Evaluation]:
        """The demand's evaluation and the answer (capped at maxReplicas x target)."""
        settings = state.settings
        series = await self.reader.ensure(settings.workload)
        self.reader.check_fresh(settings.workload)
        now = self.reader.now_ms()
        second = now // 1000
        cache_key = (settings.workload, settings)
        cached = self._cache.get(cache_key)
        if cached is not None and cached[0] == second and cached[1] == series.past_version:
            demand, evaluation, fc, size = cached[2], cached[3], cached[4], cached[5]
        else:
            size = await self._size(settings, now)
            demand, fc = evaluate(series, settings, now, size), None
            if settings.predictive and self.predictor is not None:
                fc = await self.predictor.forecast(settings, now)
                demand = combine(demand, fc, settings)
            if settings.kv_cache_target is not None or settings.in_flight_per_replica is not None:
                writers = series.live_writers(now, self.reader.liveness_ms)
                demand = apply_floor(demand, pressure(writers, settings.model), settings)
            evaluation = bound_answer(demand, settings, self.reader.ceiling)
            self._cache[cache_key] = (second, series.past_version, demand, evaluation, fc, size)
        state.last_evaluation = evaluation
        state.last_forecast = fc
        state.last_size = size
        return demand, evaluation

    async def _size(self, settings: ScalerSettings, now_ms: int) -> Size | None:
        """The arriving requests' size over ``sizeWindowSeconds`` of the minute history."""
        if not settings.size_window_s or self.history is None:
            return None
        history = await self.history.load(settings.workload, now_ms / 1000)
        return request_size(history.of(settings.model), now_ms / 1000, settings)

    def history_workloads(self) -> set[str]:
        """Workloads some ScaledObject reads the minute history of (a forecast, or the
        arriving requests' size): their history is kept."""
        return {
            st.settings.workload
            for st in self.objects.values()
            if st.settings.predictive or st.settings.size_window_s
        }

    async def saturation(self) -> dict[str, Saturation]:
        """The saturation signal of every workload asked about, for the sidecars' downgrade rules.

        Only ScaledObjects whose metadata gives ``maxReplicas`` take part (evaluating every
        one each second would cost the RPCs their latency). A workload is saturated when the
        replicas its demand asks for reach ``maxReplicas``, or when tokens arrive faster than they are served
        (> 1.1x over the stable window: the replicas serve all they can and a queue grows).
        Several ScaledObjects of one workload (one per model, say): saturated if any is. Only
        ScaledObjects of the workload's own namespace decide it (namespaces.py).
        """
        out: dict[str, Saturation] = {}
        watched = [
            state
            for state in self.objects.values()
            if state.settings.max_replicas > 0 and state.settings.workload.split("/", 1)[0] == state.namespace
        ]
        for i, state in enumerate(watched):
            if i % 20 == 19:
                await asyncio.sleep(0)  # let RPCs in between: a thousand evaluations take ~0.1 s
            # the demand's replicas, not the answer's: the signal says how far past maxReplicas
            demand, _ = await self._evaluations(state)
            signal = saturation_of(state.settings, demand)
            current = out.get(state.settings.workload)
            if current is None or (signal.saturated and not current.saturated):
                out[state.settings.workload] = signal
        return out

    def counted_models(self) -> dict[str, set[str]]:
        """Per workload, the ``model`` keys of the ScaledObjects of its own namespace."""
        out: dict[str, set[str]] = {}
        for state in self.objects.values():
            settings = state.settings
            if settings.model is not None and settings.workload.split("/", 1)[0] == state.namespace:
                out.setdefault(settings.workload, set()).add(settings.model)
        return out

    def forget_idle(self, idle_s: float) -> list[tuple[str, str]]:
        """Forget ScaledObjects KEDA has not asked about for ``idle_s`` (deleted, or moved to
        another scaler), and stop reading workloads no remaining one refers to, so memory
        follows the ScaledObjects in use, not every one ever seen."""
        now = time.time()
        gone = [
            key for key, st in self.objects.items() if now - max(st.last_asked.values(), default=0) > idle_s
        ]
        for key in gone:
            state = self.objects.pop(key)
            self.reader.ceiling.forget(*key)
            metrics = self.metrics
            for gauge in (
                metrics.value,
                metrics.target,
                metrics.desired,
                metrics.panic,
                metrics.served,
                metrics.arrived,
            ):
                with contextlib.suppress(KeyError):
                    gauge.remove(*key)
            self._cache = {k: v for k, v in self._cache.items() if k[1] != state.settings}
            if self.predictor is not None:
                self.predictor.forget(state.settings)
        in_use = {st.settings.workload for st in self.objects.values()}
        for workload in [w for w in self.reader.series if w not in in_use]:
            self.reader.drop(workload)
        self._parsed = {k: v for k, v in self._parsed.items() if (k[0], k[1]) in self.objects}
        return gone

    def answered(
        self, state: ScaledObjectState, evaluation: Evaluation, *, active: bool | None = None
    ) -> None:
        labels = (state.namespace, state.name)
        if active is None:
            state.last_value = evaluation.value
            if evaluation is state.gauged:
                return
            state.gauged = evaluation
            self.metrics.value.labels(*labels).set(evaluation.value)
            self.metrics.target.labels(*labels).set(evaluation.target)
            self.metrics.desired.labels(*labels).set(evaluation.replicas)
            self.metrics.panic.labels(*labels).set(1 if evaluation.panic_active else 0)
            self.metrics.served.labels(*labels).set(evaluation.stable.served)
            self.metrics.arrived.labels(*labels).set(evaluation.stable.arrived)
        else:
            state.last_active = active

    def describe(self, state: ScaledObjectState) -> dict[str, Any]:
        """The debug view of one ScaledObject: what the scaler sees and why it answers what it does."""
        s = state.settings
        series = self.reader.series.get(s.workload)
        now = self.reader.now_ms()
        out: dict[str, Any] = {
            "namespace": state.namespace,
            "name": state.name,
            "metadata": state.metadata,
            "settings": {
                **settings_view(s),
                "sidecarCeilingTokensPerSecond": self.reader.ceiling.per_second(s),
            },
            "metricName": METRIC_NAME,
            "target": s.target,
            "lastAsked": {m: view.iso(t) for m, t in sorted(state.last_asked.items())},
            "lastValueReturned": state.last_value,
            "lastActiveReturned": state.last_active,
            "dataFresh": self.reader.fresh(),
            "dataAgeSeconds": round(min(self.reader.data_age_s(), 1e9), 3),
            "redisError": self.reader.last_error,
        }
        evaluation = state.last_evaluation
        if series is not None:
            live = series.live_sidecars(now, self.reader.liveness_ms)
            server = pressure(series.live_writers(now, self.reader.liveness_ms), s.model)
            evaluation = evaluate(series, s, now, state.last_size)
            if s.predictive and state.last_forecast is not None:
                evaluation = combine(evaluation, state.last_forecast, s)
            evaluation = bound_answer(apply_floor(evaluation, server, s), s, self.reader.ceiling)
            out["sidecars"] = view.sidecars(series, live, server, s.model)
            out["stream"] = view.stream(
                series,
                self.reader.bad_entries.get(s.workload, 0),
                self.reader.ceiling.implausible.get(s.workload, 0),
            )
            out["tenantsLast60s"] = view.tenants(series, now, s.model)
        if self.prices is None or series is None:
            out["cost"] = describe_cost(None if self.prices is None else "no data read yet", "")
        else:
            cost = series_cost(series, self.prices, s.workload, now, self.reader.liveness_ms)
            out["cost"] = describe_cost(cost, self.prices.currency)
        if s.predictive:
            out["forecast"] = view.forecast(state.last_forecast, s)
        if evaluation is not None:
            out["evaluation"] = view.evaluation(evaluation, s)
        return out


def saturation_of(settings: ScalerSettings, evaluation: Evaluation) -> Saturation:
    """Saturated at ``maxReplicas``, or while the stable window is queueing."""
    at_max = settings.max_replicas > 0 and evaluation.replicas >= settings.max_replicas
    stable = evaluation.stable
    queueing = stable.served > 0 and stable.arrived > QUEUEING_RATIO * stable.served
    reason = MAX_REPLICAS if at_max else DEMAND if queueing else ""
    return Saturation(
        at_max or queueing, reason, evaluation.replicas, settings.max_replicas, evaluation.second * 1000
    )
