"""The sidecar's Prometheus metrics, on an injected ``CollectorRegistry``.

``tokenscaler_tokens_total`` counts final tokens when a request ends (a Prometheus
counter cannot take the negative corrections of provisional counts); the live view of a
long generation is ``tokenscaler_tokens_per_second``, a rolling rate over the provisional
served counts that the meter hands to each flush.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from sidecar.meter import Snapshot

# LLM latencies: time to first token from ~10 ms (cached prompt) to minutes (queued);
# durations up to the ten minutes a long generation may stream.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)


@dataclass(slots=True)
class Series:
    """One model x tenant's children, looked up once: ``labels()`` costs microseconds a call."""

    inflight: Gauge
    waiting: Gauge
    ttft: Histogram
    duration: Histogram
    prompt_tokens: Counter
    generation_tokens: Counter
    requests: Counter  # the family: codes are few, but not known up front
    model: str
    tenant: str
    codes: dict[str, Counter] = field(default_factory=dict)

    def request_ended(self, code: str) -> None:
        child = self.codes.get(code)
        if child is None:
            child = self.codes[code] = self.requests.labels(self.model, self.tenant, code)
        child.inc()


class Metrics:
    def __init__(self, registry: CollectorRegistry, rate_window_s: float = 30.0) -> None:
        self.registry = registry
        self.tokens = Counter(
            "tokenscaler_tokens",
            "Tokens of ended requests: the server's usage, else the fallback count.",
            ["type", "model", "tenant"],
            registry=registry,
        )
        self.estimated_tokens = Counter(
            "tokenscaler_estimated_tokens",
            "The part of tokenscaler_tokens_total counted without the server's usage "
            "(tokenizer or text length): the server reported none.",
            ["type", "model", "tenant", "method"],
            registry=registry,
        )
        self.requests = Counter(
            "tokenscaler_requests",
            "Requests ended, by HTTP status (499: the client went away).",
            ["model", "tenant", "code"],
            registry=registry,
        )
        self.duration = Histogram(
            "tokenscaler_request_duration_seconds",
            "From the request's arrival to the response's last byte.",
            ["model"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.ttft = Histogram(
            "tokenscaler_time_to_first_token_seconds",
            "From the request's arrival to the first generated content.",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.inflight = Gauge(
            "tokenscaler_inflight_requests", "Requests in flight.", ["model"], registry=registry
        )
        self.waiting = Gauge(
            "tokenscaler_waiting_requests",
            "Requests in flight that have no first token yet.",
            ["model"],
            registry=registry,
        )
        self.rate = Gauge(
            "tokenscaler_tokens_per_second",
            "Tokens served per second over the rolling window (provisional counts).",
            ["type"],
            registry=registry,
        )
        self.backlog = Gauge(
            "tokenscaler_backlog_tokens",
            "Estimated tokens of requests arrived and not served yet, at the last flush.",
            ["type"],
            registry=registry,
        )
        self.malformed = Counter(
            "tokenscaler_upstream_malformed_responses",
            "Counted responses the sidecar could not parse; counted by the fallback path.",
            ["model"],
            registry=registry,
        )
        self.usage_implausible = Counter(
            "tokenscaler_usage_implausible",
            "Responses whose usage field was outside what the request and the response allow "
            "(sidecar/usage_bounds.py), counted by the sidecar's own count instead.",
            ["field"],
            registry=registry,
        )
        self.rejected = Counter(
            "tokenscaler_rejected_requests",
            "Requests the sidecar answered itself (413, upstream unreachable...).",
            ["code"],
            registry=registry,
        )
        self.upstream_retries = Counter(
            "tokenscaler_upstream_retries",
            "Upstream requests sent again because the server closed a kept-alive connection "
            "without answering.",
            registry=registry,
        )
        self.flush_records = Counter(
            "tokenscaler_flush_records",
            "Stream records delivered to Redis (added: stored; duplicate: already stored).",
            ["result"],
            registry=registry,
        )
        self.flush_errors = Counter(
            "tokenscaler_flush_errors", "Failed attempts to deliver records to Redis.", registry=registry
        )
        self.flush_dropped = Counter(
            "tokenscaler_flush_dropped_records",
            "Records dropped because the outage buffer was full (their counts are lost).",
            registry=registry,
        )
        self.flush_buffered = Gauge(
            "tokenscaler_flush_buffered_records", "Records waiting for Redis.", registry=registry
        )
        self._window_s = rate_window_s
        self._intervals: deque[tuple[float, int, int]] = deque()
        self._series: dict[tuple[str, str], Series] = {}

    def series(self, model: str, tenant: str) -> Series:
        """The children for one model and tenant (both already bounded by the caller)."""
        found = self._series.get((model, tenant))
        if found is None:
            found = self._series[(model, tenant)] = Series(
                inflight=self.inflight.labels(model),
                waiting=self.waiting.labels(model),
                ttft=self.ttft.labels(model),
                duration=self.duration.labels(model),
                prompt_tokens=self.tokens.labels("prompt", model, tenant),
                generation_tokens=self.tokens.labels("generation", model, tenant),
                requests=self.requests,
                model=model,
                tenant=tenant,
            )
        return found

    def observe_interval(self, snapshot: Snapshot, interval_s: float) -> None:
        """Feed one flush interval's provisional counts into the rolling rate and backlog."""
        served_p = sum(c.served_prompt for c in snapshot.models.values())
        served_g = sum(c.served_generation for c in snapshot.models.values())
        self._intervals.append((interval_s, served_p, served_g))
        span = sum(i[0] for i in self._intervals)
        while len(self._intervals) > 1 and span - self._intervals[0][0] >= self._window_s:
            span -= self._intervals.popleft()[0]
        if span > 0:
            # Corrections may briefly push a window's sum below zero; a rate is not negative.
            self.rate.labels("prompt").set(max(0.0, sum(i[1] for i in self._intervals) / span))
            self.rate.labels("generation").set(max(0.0, sum(i[2] for i in self._intervals) / span))
        self.backlog.labels("prompt").set(sum(c.backlog_prompt for c in snapshot.models.values()))
        self.backlog.labels("generation").set(sum(c.backlog_generation for c in snapshot.models.values()))
