"""The scaler's own Prometheus metrics, on an injected registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

RPC_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 3.0)


class ScalerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.rpc_duration = Histogram(
            "tokenscaler_scaler_rpc_duration_seconds",
            "Time to answer one ExternalScaler RPC",
            ["method"],
            buckets=RPC_BUCKETS,
            registry=r,
        )
        self.rpc_errors = Counter(
            "tokenscaler_scaler_rpc_errors_total",
            "RPCs answered with an error",
            ["method", "code"],
            registry=r,
        )
        self.entries = Counter(
            "tokenscaler_scaler_stream_entries_total", "Stream entries read and applied", registry=r
        )
        self.bad_entries = Counter(
            "tokenscaler_scaler_bad_entries_total",
            "Stream entries skipped because they do not follow the record contract",
            ["field"],
            registry=r,
        )
        self.duplicates = Counter(
            "tokenscaler_scaler_duplicate_entries_total",
            "Entries skipped because their sidecar's seq was applied already (stored again after "
            "Redis lost its seq keys: a restart without persistence, a failover)",
            registry=r,
        )
        self.implausible = Counter(
            "tokenscaler_scaler_implausible_entries_total",
            "Entries whose tokens were above their sidecar's per-second ceiling, clamped to it",
            registry=r,
        )
        self.too_old = Counter(
            "tokenscaler_scaler_too_old_entries_total",
            "Entries older than the history the scaler keeps",
            registry=r,
        )
        self.redis_errors = Counter(
            "tokenscaler_scaler_redis_errors_total", "Failed Redis calls", ["op"], registry=r
        )
        self.workloads = Gauge("tokenscaler_scaler_workloads", "Workload streams being read", registry=r)
        self.data_age = Gauge(
            "tokenscaler_scaler_data_age_seconds",
            "Seconds since the last successful read from Redis",
            registry=r,
        )
        self.value = Gauge(
            "tokenscaler_scaler_metric_value",
            "Weighted token demand (tokens/s) last returned to KEDA",
            ["namespace", "scaledobject"],
            registry=r,
        )
        self.target = Gauge(
            "tokenscaler_scaler_metric_target",
            "Per-replica target last returned to KEDA",
            ["namespace", "scaledobject"],
            registry=r,
        )
        self.desired = Gauge(
            "tokenscaler_scaler_desired_replicas",
            "Replicas KEDA's HPA derives from the last answer: ceil(value / target)",
            ["namespace", "scaledobject"],
            registry=r,
        )
        self.served = Gauge(
            "tokenscaler_scaler_served_tokens_per_second",
            "Weighted tokens/s served over the stable window, at the last answer",
            ["namespace", "scaledobject"],
            registry=r,
        )
        self.arrived = Gauge(
            "tokenscaler_scaler_arrived_tokens_per_second",
            "Weighted tokens/s of arriving requests over the stable window, at the last answer "
            "(above served while replicas are saturated)",
            ["namespace", "scaledobject"],
            registry=r,
        )
        self.panic = Gauge(
            "tokenscaler_scaler_panic",
            "1 while the ScaledObject is in panic mode",
            ["namespace", "scaledobject"],
            registry=r,
        )
