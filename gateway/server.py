"""Start-up, the admin endpoints, signals and the shutdown order of ``token-scaler gateway``.

Shutdown on SIGTERM (or SIGINT), in this order:
1. ``/readyz`` answers 503, so Kubernetes stops sending new requests;
2. a short delay (``--shutdown-delay``) while the gateway still serves and holds;
3. the port closes; in-flight and held requests get ``--drain-timeout`` (held ones are
   still handed to replicas that appear); requests still held shortly before its end
   get 503 with ``Retry-After`` (the client's retry reaches another gateway replica);
4. the last held-demand record of each workload is written (their take-backs included),
   connections close, the admin port last.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
from collections.abc import Sequence
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from gateway.config import GatewayConfig, Route, make_gateway_id
from gateway.demand import DemandWriter, HeldDemand
from gateway.discovery import Discovery
from gateway.listener import Listener
from gateway.metrics import GatewayMetrics
from gateway.pool import Pool, Pools
from gateway.proxy import GatewayProxy, Refused
from gateway.queue import HoldQueue
from gateway.router import Replica, Router
from token_scaler import httpserve, tracing
from token_scaler.httpserve import TASK_STOP_TIMEOUT_S, end_task
from token_scaler.redis_conn import connect

log = logging.getLogger(__name__)

FINAL_FLUSH_TIMEOUT_S = 5.0
CLOSE_TIMEOUT_S = 2.0
# The cyclic collector's thresholds. Each forwarded request allocates container objects
# (its exchange, futures, the task that answers it); at Python's default (700) young-generation
# passes would run every few requests and older ones walk the live connections again and
# again. Fewer, larger passes collect the same garbage; what waits for them stays in the low
# megabytes.
GC_THRESHOLDS = (50_000, 20, 100)


class Gateway:
    def __init__(self, config: GatewayConfig, registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = GatewayMetrics(self.registry)
        self.redis = connect(config.redis_url)
        self.gateway_id = config.gateway_id or make_gateway_id()
        self.pools = Pools([self._pool(route) for route in config.routes])
        self.proxy = GatewayProxy(config, self.pools, self.metrics)
        # OpenTelemetry spans, when the OTEL_* variables configure them (token_scaler/tracing.py).
        self.tracing = tracing.load("token-scaler-gateway")
        if self.tracing is not None:
            from gateway.tracing import GatewayTracing

            self.proxy.tracing = GatewayTracing(self.tracing)
        self.discoveries = [
            Discovery(
                self.redis,
                pool.router,
                self.metrics,
                workload=pool.workload,
                liveness_s=config.replica_liveness_s,
                interval_s=config.discovery_interval_s,
                on_change=functools.partial(self.proxy.dispatch, pool),
            )
            for pool in self.pools
        ]
        self.ready = False
        self.port = config.port
        self.admin_port = config.admin_port
        self.listener: Listener | None = None
        self._admin_runner: web.BaseRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def _pool(self, route: Route) -> Pool:
        demand = HeldDemand()
        writer = DemandWriter(
            self.redis,
            demand,
            workload=route.workload,
            gateway_id=self.gateway_id,
            interval_s=self.config.flush_interval_s,
            retention_s=self.config.retention_s,
        )
        return Pool(
            route.workload,
            frozenset(route.models),
            Router(),
            HoldQueue(self.config.queue_max_requests, self.config.queue_max_tokens),
            demand,
            writer,
        )

    @property
    def queue(self) -> HoldQueue:
        """The first workload's hold queue (a gateway of one workload has only that one)."""
        return self.pools.pools[0].queue

    def readiness(self) -> dict[str, Any]:
        return {"ready": self.ready}

    async def _debug(self, request: web.Request) -> web.Response:
        return web.json_response(self.view())

    def view(self) -> dict[str, Any]:
        return {
            "gateway": self.gateway_id,
            "workloads": [
                {
                    "workload": pool.workload,
                    "models": sorted(pool.models()),
                    "namedModels": sorted(pool.named),
                    "queue": {
                        "requests": len(pool.queue),
                        "tokens": pool.queue.tokens,
                        "oldestWaitSeconds": round(pool.queue.oldest_wait(), 3),
                    },
                    "replicas": [_replica_view(r) for r in pool.router.replicas.values()],
                }
                for pool in self.pools
            ],
        }

    async def start(self) -> None:
        await self.proxy.start()
        self._admin_runner, self.admin_port = await httpserve.listen(
            httpserve.admin_app(self.registry, self.readiness, {"/debug/replicas": self._debug}),
            self.config.host,
            self.config.admin_port,
        )
        self.listener = Listener(
            self.proxy.handle,
            max_body_bytes=self.config.max_body_bytes,
            rejected=self.proxy.rejected,
            error_body=self.proxy.error_body,
            idle_timeout_s=self.config.idle_timeout_s,
        )
        self.port = await self.listener.start(self.config.host, self.config.port)
        # The first read of the announcements before the port counts as ready.
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.gather(*(d.poll_once() for d in self.discoveries)), 2.0)
        self._tasks = [asyncio.create_task(d.run()) for d in self.discoveries]
        self._tasks += [asyncio.create_task(pool.writer.run()) for pool in self.pools]
        self.ready = True
        log.info(
            "gateway %s: :%d -> replicas of %s, admin :%d",
            self.gateway_id,
            self.port,
            ", ".join(pool.workload for pool in self.pools),
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
            max(0.0, self.config.drain_timeout_s - 1.0), self._reject_held, refusal
        )
        if self.listener is not None:
            await self.listener.drain(self.config.drain_timeout_s)
        log.debug("port closed, requests drained")
        reject.cancel()
        for task in self._tasks:
            await end_task(task, TASK_STOP_TIMEOUT_S)
        log.debug("tasks stopped")
        for pool in self.pools:
            await pool.writer.close(FINAL_FLUSH_TIMEOUT_S)
        log.debug("held demand written")
        # Closing connections is bounded too: a stop must never outlast the grace period.
        for closing in (self.proxy.close(), self.redis.aclose()):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(closing, CLOSE_TIMEOUT_S)
        if self.tracing is not None:  # the spans still queued leave
            await asyncio.to_thread(self.tracing.close)
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()

    def _reject_held(self, refusal: Refused) -> None:
        for pool in self.pools:
            pool.queue.reject_all(refusal)


def _replica_view(r: Replica) -> dict[str, Any]:
    held_answer = None if r.first_held_answer_at is None else round(r.first_held_answer_at - r.seen_at, 4)
    return {
        "id": r.id,
        "url": r.url,
        "models": sorted(r.models),
        "capacity": r.capacity,
        "slots": r.slots,
        "load": r.load,
        "localTokens": r.local,
        "announcedTokens": r.announced,
        "requests": r.requests,
        # Held requests once it was there: it announced itself at most ``announcedWithinSeconds``
        # before the read that listed it (None: listed by the gateway's first read); the first
        # held request's answer began ``heldAnswerAfterDiscoverySeconds`` after that read.
        "discovery": {
            "announcedWithinSeconds": None if r.announced_within_ms is None else r.announced_within_ms / 1000,
            "heldSentInThatRead": r.held_in_first_read,
            "heldAnswerAfterDiscoverySeconds": held_answer,
        },
    }


async def serve(config: GatewayConfig) -> None:
    gc.set_threshold(*GC_THRESHOLDS)
    await httpserve.serve(Gateway(config))


def main(argv: Sequence[str] | None = None) -> int:
    config = GatewayConfig.load(argv)
    return httpserve.main(config.log_level, config.event_loop, lambda: serve(config))
