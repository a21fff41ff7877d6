"""OpenTelemetry traces of the sidecar and the gateway: on only when configured, the standard way.

Tracing is configured by the OpenTelemetry SDK's own environment variables, read once at
start-up (``TracingConfig.load``):

- it is on when ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_ENDPOINT`` is
  set, or ``OTEL_TRACES_EXPORTER=otlp``; ``OTEL_SDK_DISABLED=true`` or
  ``OTEL_TRACES_EXPORTER=none`` turn it off whatever else is set. Off, nothing of OpenTelemetry
  is imported and the request path makes no call at all (the hooks test for ``None``);
- ``OTEL_EXPORTER_OTLP_TRACES_PROTOCOL`` / ``OTEL_EXPORTER_OTLP_PROTOCOL``: ``http/protobuf``
  (the default) or ``grpc``; the exporters read the endpoint, headers, timeout, compression
  and certificates from their ``OTEL_EXPORTER_OTLP_*`` variables themselves;
- ``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG``: the standard samplers (default
  ``parentbased_always_on``);
- ``OTEL_SERVICE_NAME`` (default ``token-scaler-sidecar`` / ``token-scaler-gateway``) and
  ``OTEL_RESOURCE_ATTRIBUTES``; spans are batched (``OTEL_BSP_*``).

The packages (``pip install 'token-scaler[tracing]'``) are imported only when tracing is on;
on and missing, start-up stops with a ``ConfigError`` naming the variable that turned it on.
Trace context travels in W3C ``traceparent`` / ``tracestate`` headers (``extract``,
``inject``): continued from the client, and passed on with the context of the span that
forwards the request.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from token_scaler.errors import ConfigError

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.sdk.trace.sampling import Sampler
    from opentelemetry.trace import Tracer

log = logging.getLogger(__name__)

PROTOCOLS = ("http/protobuf", "grpc")
_RATIO_SAMPLERS = ("traceidratio", "parentbased_traceidratio")
SAMPLERS = (
    "always_on",
    "always_off",
    "parentbased_always_on",
    "parentbased_always_off",
    *_RATIO_SAMPLERS,
)
TRACE_HEADERS = ("traceparent", "tracestate")
# Seconds the spans still queued get to leave at shutdown.
FLUSH_TIMEOUT_S = 5.0


@dataclass(frozen=True, slots=True)
class TracingConfig:
    """Tracing as the environment configures it; ``load`` returns None when it is off."""

    service_name: str
    protocol: str  # one of PROTOCOLS
    sampler: str  # one of SAMPLERS
    ratio: float  # the ratio samplers' argument
    why: str  # the variable that turned tracing on (for the error when the packages are missing)

    @classmethod
    def load(cls, default_service: str, environ: Mapping[str, str] | None = None) -> TracingConfig | None:
        env = os.environ if environ is None else environ
        if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            return None
        exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
        if exporter == "none":
            return None
        if exporter not in ("", "otlp"):
            raise ConfigError(f"OTEL_TRACES_EXPORTER={exporter!r} is not supported: expected otlp or none")
        why = next(
            (
                f"{key}={env[key]}"
                for key in ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
                if env.get(key, "").strip()
            ),
            "OTEL_TRACES_EXPORTER=otlp" if exporter == "otlp" else None,
        )
        if why is None:
            return None
        protocol_key = (
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"
            if env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "").strip()
            else "OTEL_EXPORTER_OTLP_PROTOCOL"
        )
        protocol = env.get(protocol_key, "").strip().lower() or "http/protobuf"
        if protocol not in PROTOCOLS:
            raise ConfigError(f"{protocol_key}={protocol!r} is not supported: expected one of {PROTOCOLS}")
        sampler = env.get("OTEL_TRACES_SAMPLER", "").strip().lower() or "parentbased_always_on"
        if sampler not in SAMPLERS:
            raise ConfigError(f"OTEL_TRACES_SAMPLER={sampler!r} is not supported: expected one of {SAMPLERS}")
        ratio = 1.0
        raw = env.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
        if sampler in _RATIO_SAMPLERS and raw:
            try:
                ratio = float(raw)
            except ValueError:
                ratio = -1.0
            if not 0.0 <= ratio <= 1.0:
                raise ConfigError(f"OTEL_TRACES_SAMPLER_ARG={raw!r} is invalid: expected a ratio from 0 to 1")
        service = env.get("OTEL_SERVICE_NAME", "").strip() or default_service
        return cls(service, protocol, sampler, ratio, why)


class Tracing:
    """The tracer provider of one process (not the global one): its tracer, and its shutdown."""

    def __init__(self, config: TracingConfig) -> None:
        try:
            from opentelemetry.sdk.resources import SERVICE_NAME, Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
        except ImportError as exc:
            raise ConfigError(
                f"tracing is on ({config.why}) but the OpenTelemetry packages are not installed "
                f"({exc.name}): pip install 'token-scaler[tracing]'"
            ) from None
        self.config = config
        # Resource.create adds OTEL_RESOURCE_ATTRIBUTES; the service name set here wins.
        resource = Resource.create({SERVICE_NAME: config.service_name})
        self.provider: TracerProvider = TracerProvider(resource=resource, sampler=_sampler(config))
        self.provider.add_span_processor(BatchSpanProcessor(_exporter(config)))
        self.tracer: Tracer = self.provider.get_tracer("token-scaler")
        self._propagator = TraceContextTextMapPropagator()
        log.info(
            "tracing on: OTLP %s (%s), sampler %s%s, service %s",
            config.protocol,
            config.why,
            config.sampler,
            f" {config.ratio:g}" if config.sampler in _RATIO_SAMPLERS else "",
            config.service_name,
        )

    def extract(self, headers: Mapping[str, str]) -> Context:
        """The trace context the request came with (an empty one without ``traceparent``)."""
        return self._propagator.extract(headers)

    def inject(self, headers: MutableMapping[str, str], context: Context) -> None:
        """Replace the trace headers with ``context``'s."""
        for name in TRACE_HEADERS:
            headers.pop(name, None)
        self._propagator.inject(headers, context)

    def flush(self, timeout_s: float = FLUSH_TIMEOUT_S) -> bool:
        return self.provider.force_flush(int(timeout_s * 1000))

    def close(self) -> None:
        """Send the spans still queued and stop (blocking: call it off the event loop)."""
        self.flush()
        self.provider.shutdown()


def load(default_service: str, environ: Mapping[str, str] | None = None) -> Tracing | None:
    """The process' tracing, or None when the environment does not configure it."""
    config = TracingConfig.load(default_service, environ)
    return None if config is None else Tracing(config)


def _sampler(config: TracingConfig) -> Sampler:
    from opentelemetry.sdk.trace import sampling

    fixed = {
        "always_on": sampling.ALWAYS_ON,
        "always_off": sampling.ALWAYS_OFF,
        "parentbased_always_on": sampling.ParentBased(sampling.ALWAYS_ON),
        "parentbased_always_off": sampling.ParentBased(sampling.ALWAYS_OFF),
    }
    if config.sampler in fixed:
        return fixed[config.sampler]
    ratio = sampling.TraceIdRatioBased(config.ratio)
    return ratio if config.sampler == "traceidratio" else sampling.ParentBased(ratio)


def _exporter(config: TracingConfig) -> SpanExporter:
    """The OTLP span exporter of the configured protocol (it reads its own variables)."""
    try:
        if config.protocol == "grpc":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as Grpc

            return Grpc()
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as Http

        return Http()
    except ImportError as exc:
        raise ConfigError(
            f"tracing is on ({config.why}) but the OTLP {config.protocol} exporter is not installed "
            f"({exc.name}): pip install 'token-scaler[tracing]'"
        ) from None
