"""The ExternalScaler gRPC servicer: KEDA's calls mapped onto the registry.

Errors KEDA must see: bad metadata is INVALID_ARGUMENT naming the key; data that
cannot be trusted (Redis down, or not read within the staleness bound) is
UNAVAILABLE, so KEDA's ``fallback`` applies instead of a made-up value.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator

import grpc

from scaler._gen import externalscaler_pb2 as pb
from scaler._gen import externalscaler_pb2_grpc as pb_grpc
from scaler.metadata import ScalerSettings
from scaler.reader import RedisUnavailable
from scaler.registry import METRIC_NAME, Registry, ScaledObjectState
from scaler.window import Evaluation
from token_scaler.errors import MetadataError
from token_scaler.events import first_of

ACTIVE_CHECK_S = 1.0


def metric_spec(settings: ScalerSettings) -> pb.GetMetricSpecResponse:
    target = settings.target
    return pb.GetMetricSpecResponse(
        metricSpecs=[
            pb.MetricSpec(
                metricName=METRIC_NAME, targetSize=max(1, math.ceil(target)), targetSizeFloat=target
            )
        ]
    )


def metric_value(name: str, value: float) -> pb.MetricValue:
    # KEDA >= 2.17 reads the float when it is > 0, older KEDA the int: set both.
    safe = value if math.isfinite(value) and value > 0 else 0.0
    return pb.MetricValue(metricName=name, metricValue=math.ceil(safe), metricValueFloat=safe)


class ExternalScalerService(pb_grpc.ExternalScalerServicer):
    def __init__(self, registry: Registry, shutdown: asyncio.Event) -> None:
        self.registry = registry
        self.shutdown = shutdown
        self.metrics = registry.metrics

    async def _resolve(
        self, ref: pb.ScaledObjectRef, context: grpc.aio.ServicerContext[object, object], method: str
    ) -> ScaledObjectState:
        try:
            return self.registry.resolve(ref.namespace, ref.name, dict(ref.scalerMetadata), method)
        except MetadataError as exc:
            self.metrics.rpc_errors.labels(method, "INVALID_ARGUMENT").inc()
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"ScaledObject {ref.namespace}/{ref.name}: {exc}"
            )
            raise  # abort raises; this line is for the type checker

    async def _evaluate(
        self, state: ScaledObjectState, context: grpc.aio.ServicerContext[object, object], method: str
    ) -> Evaluation:
        try:
            return await self.registry.evaluate(state)
        except RedisUnavailable as exc:
            self.metrics.rpc_errors.labels(method, "UNAVAILABLE").inc()
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"workload {state.settings.workload}: {exc}")
            raise

    async def GetMetricSpec(
        self, request: pb.ScaledObjectRef, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.GetMetricSpecResponse:
        started = time.perf_counter()
        state = await self._resolve(request, context, "GetMetricSpec")
        self.metrics.rpc_duration.labels("GetMetricSpec").observe(time.perf_counter() - started)
        return metric_spec(state.settings)

    async def GetMetrics(
        self, request: pb.GetMetricsRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.GetMetricsResponse:
        started = time.perf_counter()
        state = await self._resolve(request.scaledObjectRef, context, "GetMetrics")
        evaluation = await self._evaluate(state, context, "GetMetrics")
        self.registry.answered(state, evaluation)
        response = pb.GetMetricsResponse(
            metricValues=[metric_value(request.metricName or METRIC_NAME, evaluation.value)]
        )
        self.metrics.rpc_duration.labels("GetMetrics").observe(time.perf_counter() - started)
        return response

    async def IsActive(
        self, request: pb.ScaledObjectRef, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.IsActiveResponse:
        started = time.perf_counter()
        state = await self._resolve(request, context, "IsActive")
        evaluation = await self._evaluate(state, context, "IsActive")
        self.registry.answered(state, evaluation, active=evaluation.active)
        self.metrics.rpc_duration.labels("IsActive").observe(time.perf_counter() - started)
        return pb.IsActiveResponse(result=evaluation.active)

    async def StreamIsActive(
        self, request: pb.ScaledObjectRef, context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncIterator[pb.IsActiveResponse]:
        """Sends ``true`` on every inactive -> active transition; ends cleanly on shutdown.

        ``false`` is never sent (KEDA ignores it) and ``true`` is never repeated while
        active, since each ``true`` resets KEDA's cooldown and would delay scale-to-zero.
        While the data is stale nothing is sent: the polled IsActive reports UNAVAILABLE.
        """
        state = await self._resolve(request, context, "StreamIsActive")
        was_active = False
        while not self.shutdown.is_set():
            try:
                evaluation = await self.registry.evaluate(state)
            except RedisUnavailable:
                evaluation = None
            if evaluation is not None:
                if evaluation.active and not was_active:
                    self.registry.answered(state, evaluation, active=True)
                    yield pb.IsActiveResponse(result=True)
                was_active = evaluation.active
            # Look again each second (the window moves), and as soon as new entries are read:
            # a gateway's first held request must turn the workload active at once.
            await first_of(self.registry.reader.applied(), self.shutdown, within=ACTIVE_CHECK_S)

    async def StreamMetricSpec(
        self, request: pb.ScaledObjectRef, context: grpc.aio.ServicerContext[object, object]
    ) -> AsyncIterator[pb.GetMetricSpecResponse]:
        """Sends the spec at once; it depends only on the metadata, so it never changes."""
        state = await self._resolve(request, context, "StreamMetricSpec")
        yield metric_spec(state.settings)
        await self.shutdown.wait()
