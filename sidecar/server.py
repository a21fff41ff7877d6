"""Start-up, the admin endpoints, signals and the shutdown order of ``token-scaler sidecar``.

Shutdown on SIGTERM (or SIGINT), in this order:
1. ``/readyz`` answers 503, so Kubernetes stops sending new requests;
2. a short delay (``--shutdown-delay``) while the proxy still serves, because endpoint
   removal takes a moment to reach every client;
3. the proxy port closes and in-flight requests get ``--drain-timeout`` to finish
   (long streams included); what is still running then is cancelled and counted as served
   so far;
4. the last partial interval is flushed to Redis (bounded by the same timeout);
5. connections close, the admin port last.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from sidecar.announce import Announcer, advertised_url
from sidecar.config import SidecarConfig, make_sidecar_id
from sidecar.flush import Flusher, recent_generation_means
from sidecar.loop_lag import LoopLag
from sidecar.meter import Meter
from sidecar.metrics import Metrics
from sidecar.policy import PolicyEngine
from sidecar.policy.clock import Clock
from sidecar.proxy import Proxy
from sidecar.server_gauges import ServerGaugePoller
from sidecar.tokens import load_counter
from token_scaler import httpserve, model_keys, tracing
from token_scaler.httpserve import TASK_STOP_TIMEOUT_S, end_task
from token_scaler.redis_conn import REDIS_ERRORS, connect, redact
from token_scaler.redis_routing import Commands, open_channel

log = logging.getLogger(__name__)

# Time the final flush gets after the drain, whatever the drain took.
FINAL_FLUSH_TIMEOUT_S = 5.0
# How long start-up waits in the background for the stream's generation means.
SEED_TIMEOUT_S = 2.0

# How often the models ScaledObjects count are read (a new ScaledObject's within this).
PIN_INTERVAL_S = 5.0


class Sidecar:
    """The proxy and admin servers, the meter and the flusher of one sidecar process."""

    def __init__(
        self,
        config: SidecarConfig,
        registry: CollectorRegistry | None = None,
        policy_clock: Clock | None = None,
    ) -> None:
        self.config = config
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = Metrics(self.registry, config.rate_window_s)
        self.meter = Meter(default_generation=config.default_generation_tokens)
        self.counter = load_counter(config.tokenizer)
        self.redis = connect(config.redis_url)
        self.policy: PolicyEngine | None = None
        self.proxy = self._make_proxy()
        # OpenTelemetry spans, when the OTEL_* variables configure them (token_scaler/tracing.py).
        self.tracing = tracing.load("token-scaler-sidecar")
        if self.tracing is not None:
            from sidecar.tracing import SidecarTracing

            self.proxy.tracing = SidecarTracing(self.tracing, config.upstream)
        self._policy_redis: Commands | None = None
        if config.policy is not None:
            self.policy = self.proxy.policy = self._make_policy(config.policy, policy_clock)
        metrics_url = config.server_metrics
        self.server_gauges = None if metrics_url is None else ServerGaugePoller(metrics_url)
        self.flusher = self._make_flusher()
        self.ready = False
        self.port = config.port
        self.admin_port = config.admin_port
        self._proxy_runner: web.BaseRunner | None = None
        self._admin_runner: web.BaseRunner | None = None
        self._flush_task: asyncio.Task[None] | None = None
        self._seed_task: asyncio.Task[None] | None = None
        self._policy_task: asyncio.Task[None] | None = None
        self.loop_lag = LoopLag(self.registry)
        self._lag_task: asyncio.Task[None] | None = None
        self._gauges_task: asyncio.Task[None] | None = None
        self.announcer: Announcer | None = None
        self._announce_task: asyncio.Task[None] | None = None
        self._pin_task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    def _make_proxy(self) -> Proxy:
        """The proxy in front of the upstream, metering into this sidecar's meter."""
        config = self.config
        return Proxy(
            upstream=config.upstream,
            meter=self.meter,
            metrics=self.metrics,
            counter=self.counter,
            tenant_header=config.tenant_header,
            max_tenants=config.max_tenants,
            max_models=config.max_models,
            max_body_bytes=config.max_body_bytes,
            connect_timeout_s=config.connect_timeout_s,
            read_timeout_s=config.read_timeout_s,
            models=config.models,
            body_timeout_s=config.body_timeout_s,
            upstream_ca=config.upstream_ca,
        )

    def _make_policy(self, policy: Path, clock: Clock | None) -> PolicyEngine:
        """The policy engine, on a Redis channel of its own (kept in ``_policy_redis``)."""
        config = self.config
        # One pipelined connection of its own: every request's admission and settlement
        # (redis_channel.py says why not redis-py's pool on this path).
        self._policy_redis = open_channel(config.redis_url)
        return PolicyEngine(
            policy,
            self._policy_redis,
            self.registry,
            workload=config.workload,
            tenant_header=config.tenant_header,
            label=self.proxy.tenants,
            clock=clock,
            dcgm_url=config.dcgm_url,
            server_gauges=lambda: self.server_gauges.latest() if self.server_gauges else None,
        )

    def _make_flusher(self) -> Flusher:
        """The flusher of the meter's records to the workload's stream."""
        config = self.config
        return Flusher(
            self.redis,
            self.meter,
            self.metrics,
            workload=config.workload,
            sidecar_id=config.sidecar_id or make_sidecar_id(),
            interval_s=config.flush_interval_s,
            buffer_records=config.buffer_records,
            retention_s=config.retention_s,
            server_gauges=self.server_gauges.latest if self.server_gauges else lambda: None,
        )

    def _proxy_app(self) -> web.Application:
        # The proxy reads bodies itself, with its own limit and a JSON 413.
        app = web.Application(client_max_size=self.config.max_body_bytes + 1)
        app.router.add_route("*", "/{tail:.*}", self.proxy.handle)
        return app

    def readiness(self) -> dict[str, Any]:
        return {
            "ready": self.ready,
            "sidecar": self.flusher.sidecar_id,
            "buffered_records": self.flusher.buffered,
            "redis_offset_ms": self.flusher.offset_ms,
        }

    async def start(self) -> None:
        await self.proxy.start()
        self._admin_runner, self.admin_port = await httpserve.listen(
            httpserve.admin_app(self.registry, self.readiness), self.config.host, self.config.admin_port
        )
        self._proxy_runner, self.port = await httpserve.listen(
            self._proxy_app(),
            self.config.host,
            self.config.port,
            handler_cancellation=True,  # a client that leaves cancels its upstream request
            # aiohttp closes a connection whose request head is not complete this long after it
            # opened (or after the previous response): the header timeout, and the idle one.
            keepalive_timeout=self.config.header_timeout_s,
            shutdown_timeout=self.config.drain_timeout_s,
        )
        self._flush_task = asyncio.create_task(self.flusher.run())
        self._seed_task = asyncio.create_task(self._seed_estimates())
        self._lag_task = asyncio.create_task(self.loop_lag.run())
        if self.server_gauges is not None:
            self._gauges_task = asyncio.create_task(self.server_gauges.run())
        self._pin_task = asyncio.create_task(self._pin_models())
        if self.policy is not None:
            self._policy_task = asyncio.create_task(self.policy.run())
        self.ready = True
        url = advertised_url(self.config.advertise, self.port, os.environ)
        if url is not None:  # gateways route to this sidecar once it serves
            self.announcer = Announcer(
                self.redis,
                self.meter,
                workload=self.config.workload,
                sidecar_id=self.flusher.sidecar_id,
                url=url,
                models=self.config.models,
                capacity=self.config.capacity_tokens,
                slots=self.config.capacity_requests,
            )
            self._announce_task = asyncio.create_task(
                self.announcer.run(self.proxy.session, self.config.upstream)
            )
        log.info(
            "sidecar %s: proxy :%d -> %s, admin :%d, workload %s",
            self.flusher.sidecar_id,
            self.port,
            redact(self.config.upstream),  # a URL's user:key part never reaches a log
            self.admin_port,
            self.config.workload,
        )

    async def _seed_estimates(self) -> None:
        """Seed the meter's generation estimates from the workload's stream; best effort."""
        try:
            means = await asyncio.wait_for(
                recent_generation_means(self.redis, self.config.workload), SEED_TIMEOUT_S
            )
        except REDIS_ERRORS as exc:
            log.info("no generation estimates from the stream (%s); starting from the default", exc)
            return
        self.meter.seed_generation_means(means)
        if means:
            log.info("generation estimates from the stream: %s", {m: round(v, 1) for m, v in means.items()})

    async def _pin_models(self) -> None:
        """The models the workload's ScaledObjects count stay labels (token_scaler/model_keys.py)."""
        key = model_keys.models_key(self.config.workload)
        while not self._stopping.is_set():
            try:
                raw = await asyncio.wait_for(self.redis.get(key), SEED_TIMEOUT_S)
            except REDIS_ERRORS:
                pass
            else:
                self.proxy.models.pin(model_keys.decode(raw))
            # Stopped by the event, not cancelled: a command cancelled mid-reply could leave the
            # connection pool the flusher still uses in a state its close waits on.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), PIN_INTERVAL_S)

    async def stop(self) -> None:
        self.ready = False
        if self.announcer is not None:  # gateways stop sending new requests at once
            await self.announcer.leave()
        await asyncio.sleep(self.config.shutdown_delay_s)
        if self._proxy_runner is not None:
            await self._proxy_runner.cleanup()
        self._stopping.set()
        # The start-up reads end by themselves within their timeout: cancelling a Redis
        # command in flight can leave its connection waiting forever.
        for reader in (self._pin_task, self._seed_task):
            if reader is not None:
                await asyncio.wait({reader}, timeout=SEED_TIMEOUT_S + 1)
        for task in (
            self._flush_task,
            self._policy_task,
            self._seed_task,
            self._lag_task,
            self._gauges_task,
            self._announce_task,
            self._pin_task,
        ):
            if task is not None:
                await end_task(task, TASK_STOP_TIMEOUT_S)
        if self.policy is not None:
            await self.policy.close(FINAL_FLUSH_TIMEOUT_S)
        delivered = await self.flusher.close(FINAL_FLUSH_TIMEOUT_S)
        if not delivered:
            log.warning("%d records not delivered to Redis at shutdown", self.flusher.buffered)
        await self.proxy.close()
        await self.redis.aclose()
        if self._policy_redis is not None:
            await self._policy_redis.close()
        if self.tracing is not None:  # the spans still queued leave
            await asyncio.to_thread(self.tracing.close)
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()


async def serve(config: SidecarConfig) -> None:
    await httpserve.serve(Sidecar(config))


def main(argv: Sequence[str] | None = None) -> int:
    config = SidecarConfig.load(argv)
    return httpserve.main(config.log_level, config.event_loop, lambda: serve(config))
