"""The gateway's Prometheus metrics, on an injected ``CollectorRegistry``."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600)
ROUTE_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 5e-3)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self._ended: dict[tuple[str, bool], Counter] = {}
        self.requests = Counter(
            "tokenscaler_gateway_requests",
            "Requests ended, by HTTP status (499: the client went away) and whether they waited.",
            ["code", "held"],
            registry=registry,
        )
        self.refused = Counter(
            "tokenscaler_gateway_refused_requests",
            "Requests the gateway answered itself, by reason "
            "(queue_full, queue_timeout, no_replica, model_not_found, shutdown, bad_request, too_large, "
            "head_too_large, not_implemented, expectation_failed, version_not_supported, replica_error, "
            "replica_unavailable).",
            ["reason"],
            registry=registry,
        )
        self.queue_requests = Gauge(
            "tokenscaler_gateway_queue_requests",
            "Requests held, waiting for a replica, by workload.",
            ["workload"],
            registry=registry,
        )
        self.queue_tokens = Gauge(
            "tokenscaler_gateway_queue_tokens",
            "Tokens (prompt + max_tokens, each counting 1) of the requests held, by workload.",
            ["workload"],
            registry=registry,
        )
        self.queue_oldest = Gauge(
            "tokenscaler_gateway_queue_oldest_seconds",
            "How long the oldest held request has waited, by workload.",
            ["workload"],
            registry=registry,
        )
        self.wait = Histogram(
            "tokenscaler_gateway_queue_wait_seconds",
            "Time held requests waited for a replica, by workload.",
            ["workload"],
            buckets=WAIT_BUCKETS,
            registry=registry,
        )
        self.replicas = Gauge(
            "tokenscaler_gateway_replicas",
            "Live replicas (announced, heartbeat fresh), by workload.",
            ["workload"],
            registry=registry,
        )
        self.outstanding = Gauge(
            "tokenscaler_gateway_outstanding_tokens",
            "Tokens (prompt + what may still be generated) this gateway has outstanding at replicas.",
            registry=registry,
        )
        self.route = Histogram(
            "tokenscaler_gateway_route_seconds",
            "Time to pick a replica for one request.",
            buckets=ROUTE_BUCKETS,
            registry=registry,
        )
        self.retries = Counter(
            "tokenscaler_gateway_retries",
            "Requests sent to another replica after one refused the connection or closed it unanswered.",
            registry=registry,
        )
        self.resent = Counter(
            "tokenscaler_gateway_resent_requests",
            "Requests sent again on a new connection to the same replica after it closed a kept-alive "
            "one as they went out (no byte of an answer had come).",
            registry=registry,
        )
        self.broken = Counter(
            "tokenscaler_gateway_broken_streams",
            "Responses a replica broke off after the first byte (the client's is broken off too).",
            registry=registry,
        )
        self.bad_announcements = Counter(
            "tokenscaler_gateway_bad_announcements",
            "Replica announcements skipped because they break the presence contract.",
            registry=registry,
        )

    def ended(self, code: str, held: bool) -> None:
        """A request ended with this status (the label's child is looked up once)."""
        child = self._ended.get((code, held))
        if child is None:
            child = self._ended[code, held] = self.requests.labels(code, "true" if held else "false")
        child.inc()
