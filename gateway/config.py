"""The gateway's settings: every one a flag and a ``TOKEN_SCALER_*`` variable, checked at start-up."""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sidecar.config import model_list, sidecar_id
from token_scaler import config as c
from token_scaler.errors import ConfigError
from token_scaler.httpserve import service_options
from token_scaler.record import DEFAULT_RETENTION_S


@dataclass(frozen=True, slots=True)
class Route:
    """A workload this gateway serves, and the models it names for it (empty: see ``parse_routes``)."""

    workload: str
    models: tuple[str, ...] = ()


def parse_routes(raw: str) -> tuple[Route, ...]:
    """``<namespace>/<name>[=<model>,<model>...]``, several separated by ``;`` or spaces.

    A model belongs to one workload at most. At most one workload names no models: it takes
    the requests for models no other workload names or announces (with one workload, all)."""
    out: list[Route] = []
    owner: dict[str, str] = {}
    for entry in raw.replace(";", " ").split():
        name, eq, names = entry.partition("=")
        try:
            workload = c.workload_name(name)
        except ValueError as exc:
            raise ValueError(f"{name!r}: {exc}") from None
        if any(r.workload == workload for r in out):
            raise ValueError(f"{workload} is given twice")
        models = model_list(names) if eq else ()
        for model in models:
            if model in owner:
                raise ValueError(f"model {model!r} is named for both {owner[model]} and {workload}")
            owner[model] = workload
        out.append(Route(workload, models))
    if not out:
        raise ValueError("expected <namespace>/<name>[=<model>,...], several separated by ';'")
    if sum(1 for r in out if not r.models) > 1:
        raise ValueError(
            "at most one workload may name no models (it takes the models no other one names); "
            "name the models of the others: <namespace>/<name>=<model>,..."
        )
    return tuple(out)


def workload_spec(raw: str) -> str:
    """The flag's text, checked (``parse_routes`` says the form)."""
    parse_routes(raw)
    return raw


OPTIONS: dict[str, c.Option[Any]] = {
    "workload": c.Option(
        "--workload",
        "TOKEN_SCALER_WORKLOAD",
        workload_spec,
        None,
        "<namespace>/<name>[=<model>,...] of a workload whose replicas this gateway routes to; "
        "repeat the flag (or separate by ';') for several, each naming the models it serves",
        required=True,
        repeatable=True,
    ),
    "redis_url": c.Option(
        "--redis-url",
        "REDIS_URL",
        c.redis_url,
        "redis://127.0.0.1:6379/0",
        "Redis of the sidecars and scaler",
    ),
    **service_options(
        port_help="OpenAI-compatible port",
        admin_help="/metrics, /healthz, /readyz, /debug/replicas port",
        drain_help="seconds in-flight and held requests get on SIGTERM (held ones then get 503)",
    ),
    "queue_max_requests": c.Option(
        "--queue-max-requests",
        "TOKEN_SCALER_QUEUE_MAX_REQUESTS",
        c.positive_int,
        1000,
        "requests held at once per workload (no live replica, or all full); more get 503",
    ),
    "queue_max_tokens": c.Option(
        "--queue-max-tokens",
        "TOKEN_SCALER_QUEUE_MAX_TOKENS",
        c.positive_int,
        4_000_000,
        "tokens (prompt + max_tokens, each token counting 1) held at once per workload; more get 503",
    ),
    "queue_timeout_s": c.Option(
        "--queue-timeout",
        "TOKEN_SCALER_QUEUE_TIMEOUT",
        c.positive_float,
        300.0,
        "seconds a request waits for a replica before 503 (cover the model's cold start)",
    ),
    "retry_after_s": c.Option(
        "--retry-after",
        "TOKEN_SCALER_RETRY_AFTER",
        c.positive_int,
        5,
        "Retry-After seconds sent with a 503",
    ),
    "default_generation_tokens": c.Option(
        "--default-generation-tokens",
        "TOKEN_SCALER_DEFAULT_GENERATION_TOKENS",
        c.positive_int,
        256,
        "generated tokens per choice assumed for a request without max_tokens",
    ),
    "replica_liveness_s": c.Option(
        "--replica-liveness",
        "TOKEN_SCALER_REPLICA_LIVENESS",
        c.positive_float,
        3.0,
        "seconds after its last heartbeat that a replica still gets requests",
    ),
    "discovery_interval_s": c.Option(
        "--discovery-interval",
        "TOKEN_SCALER_DISCOVERY_INTERVAL",
        c.positive_float,
        0.25,
        "seconds between reads of the replicas' announcements",
    ),
    "flush_interval_s": c.Option(
        "--flush-interval",
        "TOKEN_SCALER_FLUSH_INTERVAL",
        c.positive_float,
        1.0,
        "seconds between stream records of the held demand",
    ),
    "retention_s": c.Option(
        "--retention",
        "TOKEN_SCALER_RETENTION",
        c.positive_int,
        DEFAULT_RETENTION_S,
        "seconds of stream history Redis keeps",
    ),
    "max_body_bytes": c.Option(
        "--max-body-bytes",
        "TOKEN_SCALER_MAX_BODY_BYTES",
        c.positive_int,
        64 << 20,
        "request bodies above this get 413",
    ),
    "connect_timeout_s": c.Option(
        "--connect-timeout",
        "TOKEN_SCALER_CONNECT_TIMEOUT",
        c.positive_float,
        5.0,
        "seconds to connect to a replica",
    ),
    "read_timeout_s": c.Option(
        "--read-timeout",
        "TOKEN_SCALER_READ_TIMEOUT",
        c.positive_float,
        600.0,
        "seconds a replica may stay silent before 504",
    ),
    "idle_timeout_s": c.Option(
        "--idle-timeout",
        "TOKEN_SCALER_IDLE_TIMEOUT",
        c.positive_float,
        75.0,
        "seconds a client connection stays open without a request in progress (kept alive, or a "
        "request head still incomplete)",
    ),
    "gateway_id": c.Option(
        "--gateway-id",
        "TOKEN_SCALER_GATEWAY_ID",
        sidecar_id,
        None,
        "this gateway's id in the stream (default gw-<POD_NAME or hostname>-<random hex>)",
    ),
}


@dataclass(frozen=True)
class GatewayConfig:
    # The workloads, in the flag's form (``parse_routes``); ``routes`` holds them parsed.
    workload: str
    redis_url: str = "redis://127.0.0.1:6379/0"
    host: str = "0.0.0.0"
    port: int = 8080
    admin_port: int = 9100
    queue_max_requests: int = 1000
    queue_max_tokens: int = 4_000_000
    queue_timeout_s: float = 300.0
    retry_after_s: int = 5
    default_generation_tokens: int = 256
    replica_liveness_s: float = 3.0
    discovery_interval_s: float = 0.25
    flush_interval_s: float = 1.0
    retention_s: int = DEFAULT_RETENTION_S
    max_body_bytes: int = 64 << 20
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 600.0
    idle_timeout_s: float = 75.0
    shutdown_delay_s: float = 5.0
    drain_timeout_s: float = 60.0
    gateway_id: str | None = None
    event_loop: str = "auto"
    log_level: str = "INFO"
    routes: tuple[Route, ...] = field(init=False)

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "routes", parse_routes(self.workload))
        except ValueError as exc:
            raise ConfigError(f"TOKEN_SCALER_WORKLOAD={self.workload!r} is invalid: {exc}") from None
        if self.discovery_interval_s >= self.replica_liveness_s:
            raise ConfigError(
                "TOKEN_SCALER_DISCOVERY_INTERVAL must be below TOKEN_SCALER_REPLICA_LIVENESS "
                f"({self.discovery_interval_s:g} >= {self.replica_liveness_s:g})"
            )

    @classmethod
    def load(
        cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
    ) -> GatewayConfig:
        values = c.load(
            OPTIONS,
            argv,
            environ,
            prog="token-scaler gateway",
            description="OpenAI-compatible entry point: holds requests while a workload has no "
            "replica, routes by outstanding tokens.",
        )
        return cls(**values)


def make_gateway_id(environ: Mapping[str, str] | None = None) -> str:
    environ = os.environ if environ is None else environ
    base = environ.get("POD_NAME") or socket.gethostname() or "gateway"
    base = "".join(ch if ch.isalnum() or ch in "._-" else "-" for ch in base)[:100]
    return f"gw-{base}-{secrets.token_hex(6)}"
