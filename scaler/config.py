"""``token-scaler serve`` settings: flags and env variables, validated at start-up."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scaler.namespaces import NamespaceAccess, parse_access
from token_scaler import config as c
from token_scaler import pricing
from token_scaler.errors import ConfigError


def _price_table(raw: str) -> pricing.PriceTable:
    try:
        return pricing.load(Path(raw))
    except ConfigError as exc:
        raise ValueError(str(exc)) from exc


OPTIONS: dict[str, c.Option[Any]] = {
    "grpc_port": c.Option("--grpc-port", "TOKEN_SCALER_GRPC_PORT", c.port, 9090, "gRPC port KEDA calls"),
    "http_port": c.Option(
        "--http-port",
        "TOKEN_SCALER_HTTP_PORT",
        c.port,
        9091,
        "HTTP port for /debug/scalers, /metrics, /healthz, /readyz",
    ),
    "host": c.Option("--host", "TOKEN_SCALER_HOST", c.text, "0.0.0.0", "address both ports bind to"),
    "redis_url": c.Option(
        "--redis-url",
        "REDIS_URL",
        c.redis_url,
        "redis://localhost:6379/0",
        "Redis holding the sidecars' streams",
    ),
    "tls_cert": c.Option(
        "--tls-cert", "TOKEN_SCALER_TLS_CERT", c.existing_file, None, "server certificate (PEM): turns TLS on"
    ),
    "tls_key": c.Option(
        "--tls-key", "TOKEN_SCALER_TLS_KEY", c.existing_file, None, "server private key (PEM)"
    ),
    "client_ca": c.Option(
        "--client-ca",
        "TOKEN_SCALER_CLIENT_CA",
        c.existing_file,
        None,
        "CA for client certificates: turns mTLS on",
    ),
    "debug_token": c.Option(
        "--debug-token",
        "TOKEN_SCALER_DEBUG_TOKEN",
        c.text,
        None,
        "bearer token required for /debug/* (unset: /debug/* answers 403 unless --debug-open)",
    ),
    "debug_open": c.Option(
        "--debug-open",
        "TOKEN_SCALER_DEBUG_OPEN",
        c.boolean,
        False,
        "true: serve /debug/* (workload and tenant names, their rates) without a token",
    ),
    "cross_namespace": c.Option(
        "--allow-cross-namespace",
        "TOKEN_SCALER_ALLOW_CROSS_NAMESPACE",
        parse_access,
        None,
        "ScaledObjects that may read workloads of other namespaces: '*', or rules "
        "'<ScaledObject namespace>:<workload namespace>' separated by commas (unset: own namespace only)",
    ),
    "stale_after_s": c.Option(
        "--stale-after",
        "TOKEN_SCALER_STALE_AFTER",
        c.positive_float,
        10.0,
        "seconds without a successful Redis read before answers turn UNAVAILABLE",
    ),
    "liveness_s": c.Option(
        "--sidecar-liveness",
        "TOKEN_SCALER_SIDECAR_LIVENESS",
        c.positive_float,
        5.0,
        "seconds after its last entry that a sidecar still counts as live",
    ),
    "forget_after_s": c.Option(
        "--forget-after",
        "TOKEN_SCALER_FORGET_AFTER",
        c.positive_float,
        600.0,
        "seconds without a KEDA call after which a ScaledObject (and its stream, if unused) is forgotten",
    ),
    "shutdown_grace_s": c.Option(
        "--shutdown-grace",
        "TOKEN_SCALER_SHUTDOWN_GRACE",
        c.non_negative_float,
        5.0,
        "seconds in-flight RPCs get to finish on SIGTERM",
    ),
    "sidecar_ceiling_multiple": c.Option(
        "--sidecar-ceiling-multiple",
        "TOKEN_SCALER_SIDECAR_CEILING_MULTIPLE",
        c.positive_float,
        20.0,
        "what one sidecar may report per second, in replicas' worth (x tokensPerSecondPerReplica); "
        "more is clamped",
    ),
    "max_sidecar_tokens_per_second": c.Option(
        "--max-sidecar-tokens-per-second",
        "TOKEN_SCALER_MAX_SIDECAR_TOKENS_PER_SECOND",
        c.positive_float,
        None,
        "what one sidecar may report per second, in weighted tokens (replaces the multiple)",
    ),
    "log_level": c.Option("--log-level", "TOKEN_SCALER_LOG_LEVEL", c.text, "INFO", "logging level"),
    "prices": c.Option(
        "--prices",
        "TOKEN_SCALER_PRICES",
        _price_table,
        None,
        "price table (YAML): cost per 1k tokens and spend in /debug/scalers and /metrics",
    ),
}


@dataclass(frozen=True)
class ScalerConfig:
    grpc_port: int = 9090
    http_port: int = 9091
    host: str = "0.0.0.0"
    redis_url: str = "redis://localhost:6379/0"
    tls_cert: Path | None = None
    tls_key: Path | None = None
    client_ca: Path | None = None
    debug_token: str | None = None
    debug_open: bool = False
    cross_namespace: NamespaceAccess | None = None
    stale_after_s: float = 10.0
    liveness_s: float = 5.0
    forget_after_s: float = 600.0
    shutdown_grace_s: float = 5.0
    sidecar_ceiling_multiple: float = 20.0
    max_sidecar_tokens_per_second: float | None = None
    log_level: str = "INFO"
    prices: pricing.PriceTable | None = None

    def __post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError(
                "--tls-cert (TOKEN_SCALER_TLS_CERT) and --tls-key (TOKEN_SCALER_TLS_KEY) go together"
            )
        if self.client_ca is not None and self.tls_cert is None:
            raise ConfigError("--client-ca (TOKEN_SCALER_CLIENT_CA) needs --tls-cert and --tls-key")
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(
                f"--log-level (TOKEN_SCALER_LOG_LEVEL)={self.log_level!r}: "
                "expected DEBUG, INFO, WARNING or ERROR"
            )

    @classmethod
    def from_args(cls, argv: Sequence[str] | None, environ: Mapping[str, str] | None = None) -> ScalerConfig:
        values = c.load(
            OPTIONS,
            argv,
            environ,
            prog="token-scaler serve",
            description="KEDA external scaler on token rates",
        )
        return cls(**values)
