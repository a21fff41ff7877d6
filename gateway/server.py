"""Start-up, the admin endpoints, signals and the shutdown order of ``token-scaler gateway``.

Shutdown on SIGTERM (or SIGINT), in this order:
1. ``/readyz`` answers 503, so Kubernetes stops sending new requests;
2. a short delay (``--shutdown-delay``) while the gateway still serves and holds;
3. the port closes; in-flight and held requests get ``--drain-timeout`` (held ones are
   still handed to replicas that appear); requests still held shortly before its end
   get 503 with ``Retry-After`` (the client's retry reaches another gateway replica);
4. the last held-demand record is written (their take-backs included), connections
   close, the admin port last.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Sequence
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from gateway.config import GatewayConfig, make_gateway_id
from gateway.demand import DemandWriter, HeldDemand
from gateway.discovery import Discovery
from gateway.metrics import GatewayMetrics
from gateway.proxy import GatewayProxy, Refused
from gateway.queue import HoldQueue
from gateway.router import Router
from sidecar.server import TASK_STOP_TIMEOUT_S, end_task, loop_factory
from token_scaler.redis_conn import connect

log = logging.getLogger(__name__)

FINAL_FLUSH_TIMEOUT_S = 5.0
CLOSE_TIMEOUT_S = 2.0


class Gateway:
    def __init__(self, config: GatewayConfig, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = GatewayMetrics(self.registry)
        self.redis = connect(config.redis_url)
        self.router = Router()
        self.queue = HoldQueue(config.queue_max_requests, config.queue_max_tokens)
        self.demand = HeldDemand()
        self.gateway_id = config.gateway_id or make_gateway_id()
        self.writer = DemandWriter(
            self.redis,
            self.demand,
            workload=config.workload,
            gateway_id=self.gateway_id,
            interval_s=config.flush_interval_s,
            retention_s=config.retention_s,
        )
        self.proxy = GatewayProxy(config, self.router, self.queue, self.demand, self.writer, self.metrics)
        self.discovery = Discovery(
            self.redis,
            self.router,
            self.metrics,
            workload=config.workload,
            liveness_s=config.replica_liveness_s,
            interval_s=config.discovery_interval_s,
            on_change=self.proxy.dispatch,
        )
        self.ready = False
        self.port = config.port
        self.admin_port = config.admin_port
        self._proxy_runner: web.AppRunner | None = None
        self._admin_runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def _admin_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/debug/replicas", self._debug)
        return app

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, request: web.Request) -> web.Response:
        return web.json_response({"ready": self.ready}, status=200 if self.ready else 503)

    async def _debug(self, request: web.Request) -> web.Response:
        return web.json_response(self.view())

    def view(self) -> dict[str, Any]:
        return {
            "gateway": self.gateway_id,
            "workload": self.config.workload,
            "queue": {
                "requests": len(self.queue),
                "tokens": self.queue.tokens,
                "oldestWaitSeconds": round(self.queue.oldest_wait(), 3),
            },
            "replicas": [
                {
                    "id": r.id,
                    "url": r.url,
                    "models": sorted(r.models),
                    "capacity": r.capacity,
                    "load": r.load,
                    "localTokens": r.local,
                    "announcedTokens": r.announced,
                    "requests": r.requests,
                }
                for r in self.router.replicas.values()
            ],
        }

    async def start(self) -> None:
        await self.proxy.start()
        self._admin_runner = web.AppRunner(self._admin_app(), access_log=None)
        await self._admin_runner.setup()
        await web.TCPSite(self._admin_runner, self.config.host, self.config.admin_port).start()
        self.admin_port = _bound_port(self._admin_runner)
        app = web.Application(client_max_size=self.config.max_body_bytes + 1)
        app.router.add_route("*", "/{tail:.*}", self.proxy.handle)
        self._proxy_runner = web.AppRunner(
            app,
            access_log=None,
            handler_cancellation=True,  # a client that leaves takes its request out of the queue
            shutdown_timeout=self.config.drain_timeout_s,
        )
        await self._proxy_runner.setup()
        await web.TCPSite(self._proxy_runner, self.config.host, self.config.port, backlog=1024).start()
        self.port = _bound_port(self._proxy_runner)
        # The first read of the announcements before the port counts as ready.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.discovery.poll_once(), 2.0)
        self._tasks = [
            asyncio.create_task(self.discovery.run()),
            asyncio.create_task(self.writer.run()),
        ]
        self.ready = True
        log.info(
            "gateway %s: :%d -> replicas of %s, admin :%d",
            self.gateway_id,
            self.port,
            self.config.workload,
            self.admin_port,
        )

    async def stop(self) -> None:
        self.ready = False
        await asyncio.sleep(self.config.shutdown_delay_s)
        refusal = Refused(
            503,
            "shutdown",
            "this gateway replica is shutting down; retry (another replica will take it)",
            retry_after=1,
        )
        # Held requests get an answer before the drain's end cancels their handlers.
        reject = asyncio.get_running_loop().call_later(
            max(0.0, self.config.drain_timeout_s - 1.0), self.queue.reject_all, refusal
        )
        if self._proxy_runner is not None:
            await self._proxy_runner.cleanup()
        log.debug("port closed, requests drained")
        reject.cancel()
        for task in self._tasks:
            await end_task(task, TASK_STOP_TIMEOUT_S)
        log.debug("tasks stopped")
        await self.writer.close(FINAL_FLUSH_TIMEOUT_S)
        log.debug("held demand written")
        # Closing connections is bounded too: a stop must never outlast the grace period.
        for closing in (self.proxy.close(), self.redis.aclose()):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(closing, CLOSE_TIMEOUT_S)
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()


def _bound_port(runner: web.AppRunner) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple):
            return int(address[1])
    raise RuntimeError("the server is bound to no TCP address")


async def serve(config: GatewayConfig) -> None:
    gateway = Gateway(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await gateway.start()
    try:
        await stop.wait()
        log.info("shutting down: readiness off, draining")
    finally:
        await gateway.stop()


def main(argv: Sequence[str] | None = None) -> int:
    config = GatewayConfig.load(argv)
    logging.basicConfig(
        level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    with asyncio.Runner(loop_factory=loop_factory(config.event_loop)) as runner:
        runner.run(serve(config))
    return 0
