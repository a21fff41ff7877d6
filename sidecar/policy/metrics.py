"""The policies' Prometheus metrics, on the sidecar's registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Policy checks are a Redis round trip: tens of microseconds to a few milliseconds.
CHECK_BUCKETS = (0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.01, 0.025, 0.1, 0.5)


class PolicyMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.budget_used = Gauge(
            "tokenscaler_budget_used_ratio",
            "Share of the tenant's token budget used (the larger of daily and monthly), as last seen.",
            ["tenant"],
            registry=registry,
        )
        self.scope_sidecars = Gauge(
            "tokenscaler_policy_scope_sidecars",
            "Sidecars of the scope that announced themselves in the last minute, this one included, "
            "as last counted: without Redis each admits at most 1/this of what was left of a budget.",
            ["scope"],
            registry=registry,
        )
        self.rejections = Counter(
            "tokenscaler_policy_rejections",
            "Requests refused by a policy (budget, rate_limit, max_tokens, redis_unavailable, spend).",
            ["tenant", "reason"],
            registry=registry,
        )
        self.clamps = Counter(
            "tokenscaler_policy_clamps",
            "Requests whose max_tokens the sidecar set: default, clamped, soft-cap, budget.",
            ["tenant", "action"],
            registry=registry,
        )
        self.downgrades = Counter(
            "tokenscaler_policy_downgrades",
            "Requests sent to a cheaper model (reason: budget, saturated, spend, busy).",
            ["tenant", "model", "reason"],
            registry=registry,
        )
        self.loop_stalls = Counter(
            "tokenscaler_policy_loop_stalls",
            "Policy calls to Redis that timed out while the sidecar's own event loop was held: "
            "not counted as Redis unreachable.",
            ["op"],
            registry=registry,
        )
        self.stream_cuts = Counter(
            "tokenscaler_policy_stream_cuts",
            "Streams ended by the sidecar when they passed their budget reservation.",
            ["tenant"],
            registry=registry,
        )
        self.fail_open = Counter(
            "tokenscaler_policy_unchecked_requests",
            "Requests admitted without Redis (fail-open), accounted locally and reconciled later.",
            ["tenant"],
            registry=registry,
        )
        self.expired = Counter(
            "tokenscaler_policy_reservations_expired",
            "Reservations released because their lease ended (their sidecar died or stalled mid-request).",
            ["tenant"],
            registry=registry,
        )
        self.admissions = Counter(
            "tokenscaler_policy_admissions",
            "Requests admitted by the budget and rate-limit policies, by how: chunk (from a "
            "reservation made ahead, no round trip), redis (a reservation of its own), "
            "without_redis (fail-open).",
            ["path"],
            registry=registry,
        )
        self.chunks = Counter(
            "tokenscaler_policy_chunks",
            "Reservations made ahead for a tenant's next requests (result: taken, refused: a limit "
            "too near, requests reserve alone for a second).",
            ["result"],
            registry=registry,
        )
        self.redis_errors = Counter(
            "tokenscaler_policy_redis_errors",
            "Failed policy calls to Redis.",
            ["op"],
            registry=registry,
        )
        self.pending = Gauge(
            "tokenscaler_policy_pending_settlements",
            "Settlements waiting for Redis (retried every second).",
            registry=registry,
        )
        self.reloads = Counter(
            "tokenscaler_policy_reloads",
            "Policy file reloads (result: ok, error; an error keeps the previous policy).",
            ["result"],
            registry=registry,
        )
        self.saturated = Gauge(
            "tokenscaler_policy_saturated",
            "1 while the scaler reports this workload saturated (downgrades whenSaturated apply).",
            registry=registry,
        )
        self.spend_ratio = Gauge(
            "tokenscaler_policy_spend_ratio",
            "Share of the scope's hourly spend budget (spendGuard.perHour) used this UTC hour, as this "
            "sidecar last read it plus what it added since.",
            ["scope"],
            registry=registry,
        )
        self.action_in_force = Gauge(
            "tokenscaler_policy_action_in_force",
            "1 while a threshold action applies: spend_downgrade, spend_refuse, spend_refuse_all "
            "(the spend guard), busy_downgrade (a downgrade rule whenBusy, per model).",
            ["action", "scope", "model"],
            registry=registry,
        )
        self.check = Histogram(
            "tokenscaler_policy_check_seconds",
            "Time spent deciding a request's policies before forwarding it (a Redis round trip included, "
            "unless admitted from a chunk).",
            buckets=CHECK_BUCKETS,
            registry=registry,
        )
