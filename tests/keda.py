"""Test helpers: a client that calls the scaler exactly the way KEDA does, and a sidecar stand-in."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import redis

from scaler._gen import externalscaler_pb2 as pb
from scaler._gen import externalscaler_pb2_grpc as pb_grpc
from token_scaler.record import APPEND_SCRIPT, ModelCounts, Record, append_args, seq_key, stream_key


@dataclass
class KedaAnswer:
    metric_name: str
    target: float
    target_int: int
    value: float
    value_int: int
    active: bool

    @property
    def replicas(self) -> int:
        """KEDA's HPA with metricType AverageValue: ceil(value / target)."""
        import math

        return math.ceil(self.value / self.target - 1e-9) if self.value > 0 else 0


class KedaClient:
    """One poll as KEDA does it: GetMetricSpec -> GetMetrics (bare metric name) -> IsActive,
    each with the whole trigger metadata, ``scalerAddress`` included."""

    def __init__(self, channel: grpc.aio.Channel, address: str) -> None:
        self.stub = pb_grpc.ExternalScalerStub(channel)
        self.address = address

    def ref(self, namespace: str, name: str, metadata: dict[str, str]) -> pb.ScaledObjectRef:
        full = {"scalerAddress": self.address, **metadata}
        return pb.ScaledObjectRef(name=name, namespace=namespace, scalerMetadata=full)

    async def poll(self, namespace: str, name: str, metadata: dict[str, str]) -> KedaAnswer:
        ref = self.ref(namespace, name, metadata)
        spec = (await self.stub.GetMetricSpec(ref, timeout=3)).metricSpecs[0]
        # The HPA knows the metric as s0-<name>; KEDA strips the prefix before GetMetrics.
        hpa_name = f"s0-{spec.metricName}"
        bare = hpa_name.split("-", 1)[1]
        values = await self.stub.GetMetrics(
            pb.GetMetricsRequest(scaledObjectRef=ref, metricName=bare), timeout=3
        )
        active = await self.stub.IsActive(ref, timeout=3)
        value = values.metricValues[0]
        assert value.metricName == bare
        return KedaAnswer(
            spec.metricName,
            spec.targetSizeFloat,
            spec.targetSize,
            value.metricValueFloat,
            value.metricValue,
            active.result,
        )


class FakeSidecar:
    """Appends records through the contract's append script, as a sidecar's flusher does."""

    def __init__(self, client: redis.Redis, workload: str, sidecar: str, retention_s: int = 1200) -> None:
        self.client = client
        self.workload = workload
        self.sidecar = sidecar
        self.retention_s = retention_s
        self.seq = 0
        self.script = client.register_script(APPEND_SCRIPT)

    def now_ms(self) -> int:
        sec, usec = self.client.time()
        return int(sec * 1000 + usec // 1000)

    def flush(
        self,
        ts_ms: int | None = None,
        *,
        model: str = "m",
        sp: int = 0,
        sg: int = 0,
        ap: int | None = None,
        ag: int | None = None,
        rq: int = 0,
        ar: int = 0,
        gauges: tuple[int, int, int, int] = (0, 0, 0, 0),
        interval_ms: int = 1000,
        tenants: dict[str, tuple[int, int, int]] | None = None,
    ) -> Record:
        self.seq += 1
        counts = ModelCounts(sp, sg, sp if ap is None else ap, sg if ag is None else ag, rq, *gauges, ar)
        record = Record(self.sidecar, self.seq, ts_ms or self.now_ms(), interval_ms, {model: counts})
        if tenants:
            from token_scaler.record import TenantCounts

            record.tenants = {t: {model: TenantCounts(*v)} for t, v in tenants.items()}
        keys = [stream_key(self.workload), seq_key(self.workload, self.sidecar)]
        self.script(keys=keys, args=append_args([record], self.retention_s))
        return record
