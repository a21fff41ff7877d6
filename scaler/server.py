"""``token-scaler serve``: start-up, signals and the shutdown order.

Shutdown on SIGTERM/SIGINT, in this order: /readyz turns 503 and the gRPC health
service NOT_SERVING (so probes and KEDA's round robin move away), streams
(StreamIsActive, StreamMetricSpec) end cleanly so KEDA's reconnect backoff resets,
in-flight RPCs get ``shutdown_grace_s``, then the reader, HTTP and Redis stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Sequence
from typing import Any

import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from scaler._gen import externalscaler_pb2 as pb
from scaler._gen import externalscaler_pb2_grpc as pb_grpc
from scaler.ceiling import IngestCeiling
from scaler.config import ScalerConfig
from scaler.cost import CostCollector
from scaler.debug import make_app
from scaler.history import HistoryStore
from scaler.metrics import ScalerMetrics
from scaler.namespaces import OWN_NAMESPACE
from scaler.reader import RedisUnavailable, StreamReader
from scaler.registry import Registry
from scaler.service import ExternalScalerService
from scaler.slot_reads import SlotReads
from token_scaler import model_keys
from token_scaler.events import first_of
from token_scaler.redis_conn import REDIS_ERRORS, connect, locate, redact
from token_scaler.redis_routing import ClusterChannel
from token_scaler.saturation import TTL_MS as SATURATION_TTL_MS
from token_scaler.saturation import saturation_key

log = logging.getLogger("token_scaler.scaler")
# Redis failed now, or the streams have not been read for too long.
_UNREADABLE: tuple[type[Exception], ...] = (*REDIS_ERRORS, RedisUnavailable)

LIVENESS_SERVICE = "liveness"
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ExternalScaler"].full_name


class ScalerServer:
    def __init__(self, config: ScalerConfig, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.metrics = ScalerMetrics(registry)
        self.shutdown = asyncio.Event()
        self.ready = {"serving": False}
        self.grpc_port = 0
        self.http_port = 0
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self._build_state()
        await self._start_grpc()
        await self._start_http()
        await self._start_tasks()
        self.ready["serving"] = True
        cfg = self.config
        log.info(
            "serving ExternalScaler on %s:%d (%s), debug HTTP on %s:%d, reading %s",
            cfg.host,
            self.grpc_port,
            "mTLS" if cfg.client_ca else "TLS" if cfg.tls_cert else "plaintext",
            cfg.host,
            self.http_port,
            redact(cfg.redis_url),
        )

    def _build_state(self) -> None:
        """Redis, the stream reader, the history and the model registry the RPCs answer from."""
        cfg = self.config
        self.redis = connect(cfg.redis_url)
        where = locate(cfg.redis_url)
        self.reader = StreamReader(
            self.redis,
            self.metrics,
            stale_after_s=cfg.stale_after_s,
            liveness_s=cfg.liveness_s,
            ceiling=IngestCeiling(cfg.sidecar_ceiling_multiple, cfg.max_sidecar_tokens_per_second),
            slots=SlotReads(ClusterChannel(where), batch=5000, wait_s=1.0)
            if where.kind == "cluster"
            else None,
        )
        self.history = HistoryStore(self.redis)
        self.registry = Registry(
            self.reader,
            self.metrics,
            cfg.prices,
            self.history,
            cfg.cross_namespace or OWN_NAMESPACE,
        )
        if cfg.prices is not None:
            self.metrics.registry.register(CostCollector(self.reader, cfg.prices))
        self.health = health.aio.HealthServicer()

    async def _start_grpc(self) -> None:
        """The ExternalScaler, health and reflection services on the configured gRPC port."""
        self.server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        pb_grpc.add_ExternalScalerServicer_to_server(  # type: ignore[no-untyped-call]
            ExternalScalerService(self.registry, self.shutdown), self.server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            self.server,
        )
        self.grpc_port = self._bind_grpc(f"{self.config.host}:{self.config.grpc_port}")
        await self.server.start()

    def _bind_grpc(self, address: str) -> int:
        """Bind ``address`` with TLS (mTLS when a client CA is set) or plaintext; the bound port."""
        cfg = self.config
        if cfg.tls_cert is not None and cfg.tls_key is not None:
            credentials = grpc.ssl_server_credentials(
                [(cfg.tls_key.read_bytes(), cfg.tls_cert.read_bytes())],
                root_certificates=cfg.client_ca.read_bytes() if cfg.client_ca else None,
                require_client_auth=cfg.client_ca is not None,
            )
            port: int = self.server.add_secure_port(address, credentials)
        else:
            port = self.server.add_insecure_port(address)
        if port == 0:
            raise OSError(f"cannot bind gRPC to {address}")
        return port

    async def _start_http(self) -> None:
        """The debug/metrics/probe HTTP app on the configured HTTP port."""
        cfg = self.config
        app = make_app(
            self.registry, debug_token=cfg.debug_token, ready=self.ready, debug_open=cfg.debug_open
        )
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self.runner.setup()
        site = web.TCPSite(self.runner, cfg.host, cfg.http_port)
        await site.start()
        self.http_port = _bound_port(site, cfg.http_port)

    async def _start_tasks(self) -> None:
        """The stream reader and the background loops, with liveness SERVING from here on."""
        self._tasks.append(asyncio.create_task(self.reader.run(self.shutdown)))
        # "liveness" stays SERVING until shutdown: a gRPC liveness probe must not restart every
        # replica while Redis is away (the other names follow the data and say NOT_SERVING then).
        await self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        self._tasks.append(asyncio.create_task(self._watch_health()))
        self._tasks.append(asyncio.create_task(self._forget_idle()))
        self._tasks.append(asyncio.create_task(self._publish_saturation()))
        self._tasks.append(asyncio.create_task(self._record_history()))

    async def _watch_health(self) -> None:
        """Health follows the data: NOT_SERVING while the streams cannot be read."""
        serving: bool | None = None
        while not self.shutdown.is_set():
            fresh = self.reader.fresh()
            if fresh != serving:
                status = (
                    health_pb2.HealthCheckResponse.SERVING
                    if fresh
                    else health_pb2.HealthCheckResponse.NOT_SERVING
                )
                await self.health.set("", status)
                await self.health.set(SERVICE_NAME, status)
                serving = fresh
            # Woken at once by the first good read after stale data (so the health service
            # agrees with /readyz, which asks the reader directly); stale data is found by time.
            await first_of(self.shutdown, self.reader.revived(), within=0.5)

    async def _publish_saturation(self) -> None:
        """Once a second, the saturation signal of each workload for its sidecars
        (token_scaler/saturation.py), and the models its ScaledObjects count
        (token_scaler/model_keys.py). Every scaler replica writes the same values; while the
        data is stale nothing is written, and the keys' TTL turns the signal off."""
        while not self.shutdown.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.shutdown.wait(), 1.0)
            if not self.registry.objects or not self.reader.fresh():
                continue
            try:
                signals = await self.registry.saturation()
                pipe = self.redis.pipeline(transaction=False)
                for workload, signal in signals.items():
                    pipe.set(saturation_key(workload), signal.encode(), px=SATURATION_TTL_MS)
                for workload, models in self.registry.counted_models().items():
                    pipe.set(model_keys.models_key(workload), model_keys.encode(models), px=model_keys.TTL_MS)
                await pipe.execute()
            except _UNREADABLE as exc:
                self.metrics.redis_errors.labels("saturation").inc()
                log.debug("saturation signal not written: %s", exc)

    async def _record_history(self) -> None:
        """Every 10 s, the minutes that ended, into the history of each workload a ScaledObject
        reads the history of (scaler/history.py); nothing while the data is stale."""
        while not self.shutdown.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.shutdown.wait(), 10.0)
            if not self.reader.fresh():
                continue
            now_s = self.reader.now_ms() / 1000
            for workload in self.registry.history_workloads():
                series = self.reader.series.get(workload)
                if series is None:
                    continue
                try:
                    await self.history.load(workload, now_s)
                    await self.history.update(workload, series, now_s)
                except REDIS_ERRORS as exc:
                    self.metrics.redis_errors.labels("history").inc()
                    log.debug("history of %s not written: %s", workload, exc)

    async def _forget_idle(self) -> None:
        while not self.shutdown.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.shutdown.wait(), 30)
            for namespace, name in self.registry.forget_idle(self.config.forget_after_s):
                log.info(
                    "forgot ScaledObject %s/%s: not asked about for %gs",
                    namespace,
                    name,
                    self.config.forget_after_s,
                )

    async def stop(self) -> None:
        log.info("shutting down: health NOT_SERVING, ending streams, %gs grace", self.config.shutdown_grace_s)
        self.ready["serving"] = False
        await self.health.enter_graceful_shutdown()
        self.shutdown.set()
        await self.server.stop(self.config.shutdown_grace_s)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.runner.cleanup()
        await self.redis.aclose()


def _bound_port(site: web.TCPSite, asked: int) -> int:
    # aiohttp does not expose the port it bound; port 0 (tests) needs the real one.
    server: Any = site._server
    sockets = getattr(server, "sockets", None) or []
    return int(sockets[0].getsockname()[1]) if sockets else asked


async def serve(config: ScalerConfig) -> None:
    server = ScalerServer(config)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()


def main(argv: Sequence[str] | None = None) -> int:
    config = ScalerConfig.from_args(argv)
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    asyncio.run(serve(config))
    return 0
