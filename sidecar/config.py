"""The sidecar's settings: every one a flag and a ``TOKEN_SCALER_*`` variable, checked at start-up."""

from __future__ import annotations

import os
import secrets
import socket
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sidecar.labels import MAX_PINNED
from token_scaler import config as c
from token_scaler.errors import ConfigError
from token_scaler.httpserve import service_options
from token_scaler.record import DEFAULT_RETENTION_S, MAX_MODELS_PER_ENTRY, MAX_TENANTS_PER_ENTRY

_ID_CHARS = frozenset(string.ascii_letters + string.digits + "._-")


def sidecar_id(raw: str) -> str:
    if not 1 <= len(raw) <= 128 or not set(raw) <= _ID_CHARS:
        raise ValueError("expected 1-128 characters of [A-Za-z0-9._-]")
    return raw


def model_list(raw: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(name.strip() for name in raw.split(",") if name.strip()))
    if not names:
        raise ValueError("expected model names separated by commas")
    for name in names:
        if len(name) > 128 or not name.isprintable() or name == "other":
            raise ValueError(f"{name!r}: expected a printable name of at most 128 characters, not 'other'")
    return names


def model_metrics_url(raw: str) -> str:
    """``auto`` (the upstream's /metrics), ``off``, or an http(s) URL."""
    choice = raw.strip()
    if choice.lower() in ("auto", "off"):
        return choice.lower()
    return c.http_url(choice)


OPTIONS: dict[str, c.Option[Any]] = {
    "workload": c.Option(
        "--workload",
        "TOKEN_SCALER_WORKLOAD",
        c.workload_name,
        None,
        "<namespace>/<name> of the workload whose stream this sidecar reports to",
        required=True,
    ),
    "redis_url": c.Option(
        "--redis-url", "REDIS_URL", c.redis_url, "redis://127.0.0.1:6379/0", "Redis holding the streams"
    ),
    "upstream": c.Option(
        "--upstream", "TOKEN_SCALER_UPSTREAM", c.http_url, "http://127.0.0.1:8000", "the model server"
    ),
    "upstream_ca": c.Option(
        "--upstream-ca",
        "TOKEN_SCALER_UPSTREAM_CA",
        c.existing_file,
        None,
        "PEM file of the CAs an https upstream's certificate is verified against, instead of the "
        "system's (which honour SSL_CERT_FILE)",
    ),
    "model_metrics_url": c.Option(
        "--model-metrics-url",
        "TOKEN_SCALER_MODEL_METRICS_URL",
        model_metrics_url,
        "auto",
        "the model server's Prometheus metrics, read every second into the records (running, "
        "waiting, KV cache): auto = <upstream>/metrics, off, or a URL",
    ),
    **service_options(
        port_help="proxy port",
        admin_help="/metrics, /healthz, /readyz port",
        drain_help="seconds in-flight requests get to finish on SIGTERM",
    ),
    "tenant_header": c.Option(
        "--tenant-header", "TOKEN_SCALER_TENANT_HEADER", c.text, "X-Tenant-ID", "header naming the tenant"
    ),
    "max_tenants": c.Option(
        "--max-tenants",
        "TOKEN_SCALER_MAX_TENANTS",
        c.positive_int,
        100,
        "distinct tenants kept as labels; later ones count as 'other'",
    ),
    "max_models": c.Option(
        "--max-models",
        "TOKEN_SCALER_MAX_MODELS",
        c.positive_int,
        32,
        "distinct models kept as labels; later ones count as 'other'",
    ),
    "tokenizer": c.Option(
        "--tokenizer",
        "TOKEN_SCALER_TOKENIZER",
        c.existing_file,
        None,
        "tokenizer.json used when the server reports no usage (needs the 'tokenizers' package)",
    ),
    "default_generation_tokens": c.Option(
        "--default-generation-tokens",
        "TOKEN_SCALER_DEFAULT_GENERATION_TOKENS",
        c.positive_int,
        256,
        "generated tokens per choice assumed at arrival until a model's mean is known",
    ),
    "flush_interval_s": c.Option(
        "--flush-interval",
        "TOKEN_SCALER_FLUSH_INTERVAL",
        c.positive_float,
        1.0,
        "seconds between stream records (one record per interval)",
    ),
    "buffer_records": c.Option(
        "--buffer-records",
        "TOKEN_SCALER_BUFFER_RECORDS",
        c.positive_int,
        900,
        "records kept while Redis is unreachable (900 = 15 min at 1/s); older ones are dropped",
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
        16 << 20,
        "request bodies above this get 413 (docs/sidecar.md: memory against body size)",
    ),
    "header_timeout_s": c.Option(
        "--header-timeout",
        "TOKEN_SCALER_HEADER_TIMEOUT",
        c.positive_float,
        30.0,
        "seconds a client connection gets to send a complete request head (after it opens, or after "
        "the previous response); idle connections close after it too",
    ),
    "body_timeout_s": c.Option(
        "--body-timeout",
        "TOKEN_SCALER_BODY_TIMEOUT",
        c.positive_float,
        60.0,
        "seconds a counted request's body may take to arrive before 408",
    ),
    "connect_timeout_s": c.Option(
        "--connect-timeout",
        "TOKEN_SCALER_CONNECT_TIMEOUT",
        c.positive_float,
        5.0,
        "seconds to connect to the upstream",
    ),
    "read_timeout_s": c.Option(
        "--read-timeout",
        "TOKEN_SCALER_READ_TIMEOUT",
        c.positive_float,
        600.0,
        "seconds the upstream may stay silent (queueing included) before 504",
    ),
    "rate_window_s": c.Option(
        "--rate-window",
        "TOKEN_SCALER_RATE_WINDOW",
        c.positive_float,
        30.0,
        "window of the tokenscaler_tokens_per_second gauge, in seconds",
    ),
    "sidecar_id": c.Option(
        "--sidecar-id",
        "TOKEN_SCALER_SIDECAR_ID",
        sidecar_id,
        None,
        "this sidecar's id in the stream (default <POD_NAME or hostname>-<random hex>)",
    ),
    "policy": c.Option(
        "--policy",
        "TOKEN_SCALER_POLICY",
        c.existing_file,
        None,
        "policy file (YAML): max_tokens caps, budgets, rate limits, downgrades; reloaded when it changes",
    ),
    "dcgm_url": c.Option(
        "--dcgm-url",
        "TOKEN_SCALER_DCGM_URL",
        c.http_url,
        None,
        "DCGM exporter's metrics (DCGM_FI_DEV_GPU_UTIL), read every second when a policy "
        "downgrade rule has whenBusy.gpuUtilAbove; e.g. http://$(NODE_IP):9400/metrics",
    ),
    "advertise": c.Option(
        "--advertise",
        "TOKEN_SCALER_ADVERTISE",
        c.http_url,
        None,
        "URL gateways reach this sidecar's proxy at, announced in Redis "
        "(default http://$POD_IP:<port> when POD_IP is set; else no announcement)",
    ),
    "models": c.Option(
        "--models",
        "TOKEN_SCALER_MODELS",
        model_list,
        None,
        "comma-separated models this workload serves: announced to gateways, and the only model names "
        "kept as labels (default: the upstream's /v1/models announced; labels: the first answered)",
    ),
    "capacity_tokens": c.Option(
        "--capacity-tokens",
        "TOKEN_SCALER_CAPACITY_TOKENS",
        c.non_negative_int,
        0,
        "in-flight tokens (prompt + max_tokens) gateways send this replica at once; 0: no cap",
    ),
    "capacity_requests": c.Option(
        "--capacity-requests",
        "TOKEN_SCALER_CAPACITY_REQUESTS",
        c.non_negative_int,
        0,
        "requests gateways send this replica at once (the server's concurrency); 0: no cap",
    ),
}


@dataclass(frozen=True)
class SidecarConfig:
    workload: str
    redis_url: str = "redis://127.0.0.1:6379/0"
    upstream: str = "http://127.0.0.1:8000"
    upstream_ca: Path | None = None
    model_metrics_url: str = "auto"
    host: str = "0.0.0.0"
    port: int = 8080
    admin_port: int = 9100
    tenant_header: str = "X-Tenant-ID"
    max_tenants: int = 100
    max_models: int = 32
    tokenizer: Path | None = None
    default_generation_tokens: int = 256
    flush_interval_s: float = 1.0
    buffer_records: int = 900
    retention_s: int = DEFAULT_RETENTION_S
    max_body_bytes: int = 16 << 20
    header_timeout_s: float = 30.0
    body_timeout_s: float = 60.0
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 600.0
    shutdown_delay_s: float = 5.0
    drain_timeout_s: float = 60.0
    rate_window_s: float = 30.0
    sidecar_id: str | None = None
    event_loop: str = "auto"
    log_level: str = "INFO"
    policy: Path | None = None
    dcgm_url: str | None = None
    advertise: str | None = None
    models: tuple[str, ...] | None = None
    capacity_tokens: int = 0
    capacity_requests: int = 0

    @property
    def server_metrics(self) -> str | None:
        """Where the model server's metrics are read from; None when off."""
        if self.model_metrics_url == "off":
            return None
        if self.model_metrics_url == "auto":
            return self.upstream.rstrip("/") + "/metrics"
        return self.model_metrics_url

    def __post_init__(self) -> None:
        # One label value is kept for "other", and a record holds at most this many.
        if self.max_models >= MAX_MODELS_PER_ENTRY:
            raise ConfigError(f"TOKEN_SCALER_MAX_MODELS must be below {MAX_MODELS_PER_ENTRY}")
        if self.max_tenants >= MAX_TENANTS_PER_ENTRY:
            raise ConfigError(f"TOKEN_SCALER_MAX_TENANTS must be below {MAX_TENANTS_PER_ENTRY}")
        if self.models is not None and len(self.models) >= MAX_MODELS_PER_ENTRY - MAX_PINNED:
            raise ConfigError(f"TOKEN_SCALER_MODELS: at most {MAX_MODELS_PER_ENTRY - MAX_PINNED - 1} names")

    @classmethod
    def load(
        cls, argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
    ) -> SidecarConfig:
        values = c.load(
            OPTIONS,
            argv,
            environ,
            prog="token-scaler sidecar",
            description="Token-metering reverse proxy beside an OpenAI-compatible model server.",
        )
        return cls(**values)


def make_sidecar_id(environ: Mapping[str, str] | None = None) -> str:
    """<POD_NAME or hostname>-<random hex>: unique per process, readable in the stream."""
    environ = os.environ if environ is None else environ
    base = environ.get("POD_NAME") or socket.gethostname() or "sidecar"
    base = "".join(ch if ch in _ID_CHARS else "-" for ch in base)[:100]
    return f"{base}-{secrets.token_hex(6)}"
