"""``token-scaler demo --from-zero``: a workload at zero replicas, woken by its requests.

In this process: Redis (as ``token-scaler demo``), the scaler, a gateway, and a stand-in for
KEDA + the HPA that subscribes to ``StreamIsActive``, polls the scaler once a second and
starts or stops simulated model replicas (a simulated model server and a sidecar each,
after a ``--cold-start`` delay) to the count its answers imply. The load (a sample of the
packaged trace) starts after a few idle seconds and goes through the gateway: the first
requests wait there while the first replica starts, the replicas follow the demand, and
once the load stops the workload returns to zero after the cooldown. A row a second;
the run ends at zero (or after ``--duration``) with a summary.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import signal
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import grpc
from aiohttp import web
from prometheus_client import CollectorRegistry

from demo.load import LoadStats, Planned, mean_weighted_tokens, plan, replay
from demo.model_sim import GENERATION_WEIGHT, PROMPT_WEIGHT, SimulatedModel
from gateway.config import GatewayConfig
from gateway.server import Gateway
from scaler._gen import externalscaler_pb2 as pb
from scaler._gen import externalscaler_pb2_grpc as pb_grpc
from scaler.config import ScalerConfig
from scaler.server import ScalerServer
from sidecar.config import SidecarConfig
from sidecar.server import Sidecar
from token_scaler.redis_conn import free_port
from tuning.trace import load_sample

WORKLOAD = "demo/from-zero"
MODEL = "sim-llm"
HEADROOM = 1.3
IDLE_S = 3.0  # at zero before the load starts
COOLDOWN_S = 5.0  # KEDA's cooldownPeriod: inactive this long -> 0 replicas
STABILIZATION_S = 5.0  # the HPA's scale-down stabilization window


@dataclass
class Replica:
    name: str
    model: SimulatedModel
    runner: web.AppRunner | None = None
    sidecar: Sidecar | None = None
    ready: bool = False

    async def stop(self) -> None:
        if self.sidecar is not None and self.sidecar.ready:
            await self.sidecar.stop()
        if self.runner is not None:
            await self.runner.cleanup()


@dataclass
class Keda:
    """KEDA + HPA + Deployment controller for the demo's replicas."""

    redis_url: str
    capacity: float
    cold_start_s: float
    max_replicas: int
    replicas: list[Replica] = field(default_factory=list)
    last_active: float = -1e9
    recommendations: list[tuple[float, int]] = field(default_factory=list)
    started: int = 0
    peak: int = 0
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    first_ready: float | None = None  # monotonic

    async def _start(self, replica: Replica) -> None:
        await asyncio.sleep(self.cold_start_s)  # scheduling, image pull, model load
        port = free_port()
        replica.runner = web.AppRunner(replica.model.app(), access_log=None, handler_cancellation=True)
        await replica.runner.setup()
        model_port = free_port()
        await web.TCPSite(replica.runner, "127.0.0.1", model_port).start()
        replica.sidecar = Sidecar(
            SidecarConfig(
                workload=WORKLOAD,
                redis_url=self.redis_url,
                upstream=f"http://127.0.0.1:{model_port}",
                host="127.0.0.1",
                port=port,
                admin_port=0,
                shutdown_delay_s=0.0,
                drain_timeout_s=5.0,
                sidecar_id=replica.name,
                advertise=f"http://127.0.0.1:{port}",
                models=(MODEL,),
                capacity_requests=replica.model.max_batch,
                model_metrics_url="off",  # the simulated server has no /metrics
            ),
            CollectorRegistry(),
        )
        await replica.sidecar.start()
        replica.ready = True
        if self.first_ready is None:
            self.first_ready = time.monotonic()

    def scale(self, desired: int) -> None:
        while len(self.replicas) < desired:
            self.started += 1
            replica = Replica(f"replica-{self.started}", SimulatedModel(capacity=self.capacity, model=MODEL))
            self.replicas.append(replica)
            self._spawn(self._start(replica))
        while len(self.replicas) > desired:
            self._spawn(self.replicas.pop().stop())
        self.peak = max(self.peak, len(self.replicas))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def on_poll(self, value: float, target: float, active: bool) -> int:
        now = time.monotonic()
        if active:
            self.last_active = now
        hpa = min(self.max_replicas, max(1, math.ceil(value / target - 1e-9)))
        self.recommendations = [(t, r) for t, r in self.recommendations if now - t < STABILIZATION_S]
        self.recommendations.append((now, hpa))
        if now - self.last_active > COOLDOWN_S:
            desired = 0
        elif not self.replicas:
            desired = hpa
        else:
            desired = max(r for _, r in self.recommendations)
        self.scale(desired)
        return desired

    async def close(self) -> None:
        self.scale(0)
        while self.tasks:
            await asyncio.gather(*list(self.tasks), return_exceptions=True)


async def watch_activation(stub: pb_grpc.ExternalScalerStub, ref: pb.ScaledObjectRef, keda: Keda) -> None:
    async for answer in stub.StreamIsActive(ref):
        if answer.result:
            keda.last_active = time.monotonic()
            if not keda.replicas:
                keda.scale(1)


HEADER = (
    "  time | load | held at gateway | replicas ready / running | KEDA metric / target, weighted tok/s | "
    "active | answered / sent"
)


@dataclass
class Run:
    """One demo run: its servers, its load and what it saw."""

    args: argparse.Namespace
    scaler: ScalerServer
    gateway: Gateway
    keda: Keda
    planned: list[Planned]
    metadata: dict[str, str]
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    stats: LoadStats = field(default_factory=LoadStats)
    load: asyncio.Task[None] | None = None
    peak_held: int = 0
    back_to_zero: bool = False

    async def poll(self, stub: pb_grpc.ExternalScalerStub, ref: pb.ScaledObjectRef, t: float) -> str:
        """One KEDA poll, the stand-in's decision, and the row to print."""
        spec = (await stub.GetMetricSpec(ref, timeout=3)).metricSpecs[0]
        request = pb.GetMetricsRequest(scaledObjectRef=ref, metricName=spec.metricName)
        value = (await stub.GetMetrics(request, timeout=3)).metricValues[0].metricValueFloat
        active = (await stub.IsActive(ref, timeout=3)).result
        self.keda.on_poll(value, spec.targetSizeFloat, active)
        held = len(self.gateway.queue)
        self.peak_held = max(self.peak_held, held)
        phase = "-" if self.load is None else ("on" if not self.load.done() else "done")
        ready = sum(r.ready for r in self.keda.replicas)
        return (
            f"{t:5.0f}s | {phase:4} | {held:15d} | {ready:7d} / {len(self.keda.replicas):<15d} | "
            f"{value:11.0f} / {spec.targetSizeFloat:<24.0f} | {active!s:6} | "
            f"{self.stats.ok} / {self.stats.sent}"
        )

    async def rows(self) -> None:
        """A row a second until the workload is back at zero after the load, or the time is up."""
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.scaler.grpc_port}") as channel:
            stub = pb_grpc.ExternalScalerStub(channel)  # type: ignore[no-untyped-call]
            ref = pb.ScaledObjectRef(name="from-zero", namespace="demo", scalerMetadata=self.metadata)
            watcher = asyncio.create_task(watch_activation(stub, ref, self.keda))
            print(HEADER)
            started = time.monotonic()
            next_tick = started + 1.0
            while not self.stop.is_set() and time.monotonic() - started < self.args.duration:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), max(0.0, next_tick - time.monotonic()))
                next_tick += 1.0
                t = time.monotonic() - started
                if self.load is None and t >= IDLE_S:
                    target = [f"http://127.0.0.1:{self.gateway.port}"]
                    self.load = asyncio.create_task(
                        replay(self.planned, target, MODEL, self.stats, self.stop)
                    )
                print(await self.poll(stub, ref, t), flush=True)
                if self.load is not None and self.load.done() and self.keda.peak and not self.keda.replicas:
                    self.back_to_zero = True
                    break
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await watcher

    async def close(self) -> None:
        self.stop.set()
        if self.load is not None:
            await self.load
        await self.keda.close()
        await self.gateway.stop()
        await self.scaler.stop()

    def summary(self) -> None:
        stats, keda = self.stats, self.keda
        print()
        print(f"requests: {stats.sent} sent through the gateway, {stats.ok} answered, {stats.failed} failed")
        if stats.sent_times and keda.first_ready is not None:
            print(
                f"the first replica was ready {keda.first_ready - stats.sent_times[0]:.1f} s after the "
                f"first request ({self.args.cold_start:g} s of it its cold start); the gateway held up "
                f"to {self.peak_held} requests at once"
            )
        print(
            f"replicas: 0 -> {keda.peak} -> {len(keda.replicas)}"
            + ("" if self.back_to_zero else " (stopped before the workload was back at zero)")
        )
        print("everything stopped.")


async def run_from_zero(args: argparse.Namespace, redis_url: str) -> int:
    trace = load_sample()
    capacity = args.rps * mean_weighted_tokens(
        trace, PROMPT_WEIGHT, GENERATION_WEIGHT
    )  # two replicas half busy
    load_s = max(10.0, min(30.0, args.duration / 3))
    planned = plan(
        trace, duration_s=load_s, rps=args.rps, burst=(0.4, 0.7), burst_factor=2,
        burst_generation_factor=2, seed=args.seed,
    )  # fmt: skip
    scaler = ScalerServer(
        ScalerConfig(grpc_port=0, http_port=0, host="127.0.0.1", redis_url=redis_url, log_level="WARNING")
    )
    gateway = Gateway(
        GatewayConfig(
            workload=WORKLOAD, redis_url=redis_url, host="127.0.0.1", port=0, admin_port=0,
            shutdown_delay_s=0.0, drain_timeout_s=5.0, discovery_interval_s=0.1, queue_timeout_s=120.0,
        ),
        CollectorRegistry(),
    )  # fmt: skip
    metadata = {
        "tokensPerSecondPerReplica": f"{capacity:.0f}",
        "headroom": str(HEADROOM),
        "promptWeight": f"{PROMPT_WEIGHT:g}",
        "generationWeight": f"{GENERATION_WEIGHT:g}",
        "workload": WORKLOAD,
        "windowSeconds": "10",
        "panicWindowSeconds": "2",
        "activationTokensPerSecond": "0",
    }
    run = Run(
        args, scaler, gateway, Keda(redis_url, capacity, args.cold_start, args.replicas), planned, metadata
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, run.stop.set)
    await scaler.start()
    await gateway.start()
    print(
        f"scaler: gRPC 127.0.0.1:{scaler.grpc_port}; gateway: http://127.0.0.1:{gateway.port}/v1 "
        f"(admin :{gateway.admin_port}); replicas: 0 of at most {args.replicas}, {capacity:.0f} weighted "
        f"tokens/s each, {args.cold_start:g} s cold start\n"
        f"load: {len(planned)} requests from {IDLE_S:g}s to {IDLE_S + load_s:.0f}s through the gateway; "
        f"KEDA cooldown {COOLDOWN_S:g}s\n"
    )
    try:
        await run.rows()
    finally:
        await run.close()
    run.summary()
    return 0
