"""``token-scaler demo``: the main job in one command, on an embedded default.

Starts, in this process: Redis (``REDIS_URL`` if given, else a ``redis-server`` from
PATH on a free port, else an in-process Redis-compatible server), four replicas of a
simulated model server with a fixed token capacity, a sidecar in front of each, the
scaler, and a load generator: steady (Poisson) arrivals sized like a real trace's
requests, with a phase in the middle (``--scenario``; by default the same request rate
with much longer answers). Every second it polls the scaler as KEDA does and prints a
row (``demo/table.py``): request and token rates, the demand and KEDA's metric, the
replicas KEDA's HPA would run by tokens and by requests/s, and the model servers' queue.
It stops by itself after ``--duration`` seconds (Ctrl-C stops it at once), prints a
summary, removes its keys from Redis and leaves nothing running.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
import grpc
from aiohttp import web

from demo.load import LoadStats, mean_weighted_tokens, plan, replay
from demo.model_sim import GENERATION_WEIGHT, PROMPT_WEIGHT, SimulatedModel
from demo.table import Row, format_row, header
from scaler._gen import externalscaler_pb2 as pb
from scaler._gen import externalscaler_pb2_grpc as pb_grpc
from scaler.config import ScalerConfig
from scaler.server import ScalerServer
from sidecar.config import SidecarConfig
from sidecar.server import Sidecar
from token_scaler.config import redis_url_argument
from token_scaler.record import workload_keys
from token_scaler.redis_conn import REDIS_ERRORS, LocalRedis, answers, connect, free_port
from tuning.trace import load_sample

WORKLOAD = "demo/sim-llm"
MODEL = "sim-llm"
HEADROOM = 1.3
WINDOW_S = 15  # shorter than the default 60 s: a one-minute demo shows the phase take full effect
BUSY = 0.4  # how busy the base load keeps the simulated replicas
PHASE = (1 / 3, 0.9)  # when the scenario's phase runs, as fractions of the load


@dataclass(frozen=True)
class Scenario:
    """What changes during the phase: requests come ``requests`` times as often, and each
    answer is ``generation`` times longer."""

    label: str  # the phase column's text
    requests: int
    generation: float

    def describe(self) -> str:
        rate = "the same request rate" if self.requests == 1 else f"{self.requests}x the requests"
        return f"{rate}, answers {self.generation:g}x longer"


SCENARIOS = {
    # The point of the project: requests/s stays flat while the work per request grows.
    "longer": Scenario("long answers", requests=1, generation=16),
    "surge": Scenario("surge", requests=2, generation=4),
}


@dataclass
class Embedded:
    url: str
    description: str
    stop: Any = None


def start_redis(url: str | None) -> Embedded:
    if url:
        if not answers(url):
            raise SystemExit(f"token-scaler demo: REDIS_URL={url} does not answer")
        return Embedded(url, f"Redis at {url} (REDIS_URL)")
    exe = shutil.which("redis-server")
    if exe:
        server = LocalRedis.start(binary=exe)
        return Embedded(server.url, f"embedded redis-server ({exe}) on 127.0.0.1:{server.port}", server.stop)
    try:
        from fakeredis import TcpFakeServer
    except ImportError:
        raise SystemExit(
            "token-scaler demo: no REDIS_URL, no redis-server on PATH, and the in-process server is not "
            "installed: pip install 'token-scaler[demo]' (or apt-get install redis-server)"
        ) from None
    port = free_port()
    fake = TcpFakeServer(("127.0.0.1", port), server_type="redis")
    thread = threading.Thread(target=fake.serve_forever, daemon=True)
    thread.start()

    def stop() -> None:
        fake.shutdown()
        fake.server_close()

    return Embedded(
        f"redis://127.0.0.1:{port}/0",
        f"in-process Redis-compatible server (fakeredis) on 127.0.0.1:{port}",
        stop,
    )


async def forget(url: str, workload: str) -> None:
    """Removes every key of ``workload``: the demo starts from an empty stream and leaves
    nothing behind, so a rerun on the same Redis prints the same table."""
    client = connect(url)
    try:
        async for key in client.scan_iter(match=workload_keys(workload), count=1000):
            await client.delete(key)  # one by one: a cluster deletes keys of one slot per command
    finally:
        await client.aclose()


@dataclass(frozen=True)
class Sizing:
    """The simulated replicas and the load, sized from the trace and the options."""

    capacity: float  # weighted tokens/s one simulated replica serves
    rps_target: float  # requests/s per replica a requests-based scaler is calibrated to
    load_s: float  # seconds of load (the last seconds of the run let queues drain)
    phase_s: tuple[float, float]  # when the scenario's phase runs, seconds since the load started

    @staticmethod
    def of(args: argparse.Namespace, mean_weighted: float) -> Sizing:
        # Size a replica so that the base load keeps the replicas BUSY busy: room for the phase.
        capacity = args.rps * mean_weighted / (args.replicas * BUSY)
        load_s = max(10.0, args.duration - 15.0)
        return Sizing(capacity, capacity / mean_weighted, load_s, (PHASE[0] * load_s, PHASE[1] * load_s))


async def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    trace = load_sample()
    size = Sizing.of(args, mean_weighted_tokens(trace, PROMPT_WEIGHT, GENERATION_WEIGHT))
    scenario = SCENARIOS[args.scenario]
    planned = plan(
        trace,
        duration_s=size.load_s,
        rps=args.rps,
        burst=PHASE,
        burst_factor=scenario.requests,
        burst_generation_factor=scenario.generation,
        seed=args.seed,
    )

    stop, interrupted = asyncio.Event(), asyncio.Event()

    def on_signal() -> None:
        interrupted.set()
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):  # before anything starts: all of it is stopped
        loop.add_signal_handler(sig, on_signal)
    redis_ = start_redis(args.redis_url)
    print(f"Redis: {redis_.description}")
    stack = contextlib.AsyncExitStack()
    stats = LoadStats()
    rows: list[Row] = []
    try:
        await forget(redis_.url, WORKLOAD)
        models, sidecars = await start_replicas(stack, args.replicas, size.capacity, redis_.url)
        scaler = await start_scaler(stack, redis_.url)
        print(
            f"model server: {args.replicas} simulated replicas, {size.capacity:.0f} weighted tokens/s each "
            f"(prompt token = {PROMPT_WEIGHT:g}, generated token = {GENERATION_WEIGHT:g})\n"
            f"sidecars: {', '.join(f'127.0.0.1:{s.port}' for s in sidecars)} "
            f"-> stream of workload {WORKLOAD}\n"
            f"scaler: gRPC 127.0.0.1:{scaler.grpc_port}, debug http://127.0.0.1:{scaler.http_port}/debug/scalers\n"
            f"load: {len(planned)} requests, Poisson arrivals at {args.rps:g} req/s, sizes from the "
            f"packaged trace ({trace.attribution})\n"
            f"from {size.phase_s[0]:.0f}s to {size.phase_s[1]:.0f}s ({scenario.label!r}): "
            f"{scenario.describe()}; load stops at {size.load_s:.0f}s\n"
            f"weighted tokens = {PROMPT_WEIGHT:g} x prompt + {GENERATION_WEIGHT:g} x generated; "
            "KEDA's target per replica: "
            f"{size.capacity / HEADROOM:.0f} weighted tokens/s (capacity / headroom {HEADROOM}); a "
            f"requests/s scaler is calibrated to {size.rps_target / HEADROOM:.2f} req/s per replica on "
            f"the trace's mean request\n"
        )
        load = asyncio.create_task(
            replay(planned, [f"http://127.0.0.1:{s.port}" for s in sidecars], MODEL, stats, stop)
        )
        await watch(scaler, size, scenario, stats, models, stop, args.duration, rows)
        stop.set()
        await load
    finally:
        stop.set()
        await stack.aclose()
        with contextlib.suppress(*REDIS_ERRORS):  # a Redis of the user's that went away
            await forget(redis_.url, WORKLOAD)
        if redis_.stop is not None:
            redis_.stop()
    print_summary(rows, stats, sidecars, models, scenario, interrupted.is_set())
    return 0


async def start_replicas(
    stack: contextlib.AsyncExitStack, count: int, capacity: float, redis_url: str
) -> tuple[list[SimulatedModel], list[Sidecar]]:
    """``count`` simulated model servers, each behind a sidecar, stopped with ``stack``."""
    models: list[SimulatedModel] = []
    sidecars: list[Sidecar] = []
    for i in range(count):
        model = SimulatedModel(
            capacity=capacity, prompt_cost=PROMPT_WEIGHT, generation_cost=GENERATION_WEIGHT, model=MODEL
        )
        runner = web.AppRunner(model.app(), access_log=None, handler_cancellation=True)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        stack.push_async_callback(runner.cleanup)
        models.append(model)
        sidecar = Sidecar(
            SidecarConfig(
                workload=WORKLOAD,
                redis_url=redis_url,
                upstream=f"http://127.0.0.1:{port}",
                host="127.0.0.1",
                port=0,
                admin_port=0,
                shutdown_delay_s=0.0,
                drain_timeout_s=2.0,
                sidecar_id=f"demo-replica-{i}",
                model_metrics_url="off",  # the simulated server has no /metrics
                log_level="WARNING",
            )
        )
        await sidecar.start()
        stack.push_async_callback(sidecar.stop)
        sidecars.append(sidecar)
    return models, sidecars


async def start_scaler(stack: contextlib.AsyncExitStack, redis_url: str) -> ScalerServer:
    scaler = ScalerServer(
        ScalerConfig(
            grpc_port=0,
            http_port=0,
            host="127.0.0.1",
            redis_url=redis_url,
            log_level="WARNING",
            debug_open=True,  # loopback only: the demo reads its debug view
        )
    )
    await scaler.start()
    stack.push_async_callback(scaler.stop)
    return scaler


async def watch(
    scaler: ScalerServer,
    size: Sizing,
    scenario: Scenario,
    stats: LoadStats,
    models: list[SimulatedModel],
    stop: asyncio.Event,
    duration: float,
    rows: list[Row],
) -> None:
    """Poll the scaler as KEDA does once a second, printing a row each time and adding it to
    ``rows``, until ``duration`` seconds have passed or ``stop`` is set."""
    metadata = {
        "scalerAddress": f"127.0.0.1:{scaler.grpc_port}",
        "tokensPerSecondPerReplica": f"{size.capacity:.0f}",
        "headroom": str(HEADROOM),
        "promptWeight": f"{PROMPT_WEIGHT:g}",
        "generationWeight": f"{GENERATION_WEIGHT:g}",
        "workload": WORKLOAD,
        "windowSeconds": str(WINDOW_S),
    }
    started = time.monotonic()
    print(header())
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{scaler.grpc_port}") as channel,
        aiohttp.ClientSession() as http,
    ):
        stub = pb_grpc.ExternalScalerStub(channel)  # type: ignore[no-untyped-call]
        ref = pb.ScaledObjectRef(name="sim-llm", namespace="demo", scalerMetadata=metadata)
        next_tick = started + 1.0
        while not stop.is_set() and time.monotonic() - started < duration:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, next_tick - time.monotonic()))
            if stop.is_set():
                break
            next_tick += 1.0
            t = time.monotonic() - started
            phase = scenario.label if size.phase_s[0] <= t < size.phase_s[1] else ""
            row = await poll(stub, ref, http, scaler.http_port, stats, size.rps_target, t, phase, models)
            rows.append(row)
            print(format_row(row), flush=True)


async def poll(
    stub: pb_grpc.ExternalScalerStub,
    ref: pb.ScaledObjectRef,
    http: aiohttp.ClientSession,
    http_port: int,
    stats: LoadStats,
    rps_target: float,
    t: float,
    phase: str,
    models: list[SimulatedModel],
) -> Row:
    """One KEDA poll (GetMetricSpec -> GetMetrics) plus the scaler's debug view."""
    spec = (await stub.GetMetricSpec(ref, timeout=3)).metricSpecs[0]
    metric = await stub.GetMetrics(
        pb.GetMetricsRequest(scaledObjectRef=ref, metricName=spec.metricName), timeout=3
    )
    value = metric.metricValues[0].metricValueFloat
    async with http.get(f"http://127.0.0.1:{http_port}/debug/scalers/demo/sim-llm") as r:
        debug = await r.json()
    evaluation = debug.get("evaluation", {})
    stable = evaluation.get("stable", {})
    # requests/s over the same window as the token scaler's, for a like-for-like comparison
    rps = stats.arrivals_per_s(evaluation.get("windowCoverageSeconds") or WINDOW_S)
    return Row(
        t=t,
        phase=phase,
        arrivals_rps=rps,
        served_prompt=stable.get("servedPromptTokensPerSecond", 0.0),
        served_generation=stable.get("servedGenerationTokensPerSecond", 0.0),
        demand=stable.get("demand", 0.0),
        value=value,
        target=spec.targetSizeFloat,
        requests_replicas=math.ceil(rps * HEADROOM / rps_target - 1e-9) if rps > 0 else 0,
        queued=sum(len(m.queue) for m in models),
        in_flight=sum(len(m.active) for m in models),
        rule=evaluation.get("rule", "-"),
    )


def _sidecar_tokens(sidecar: Sidecar, kind: str) -> float:
    total = 0.0
    for metric in sidecar.registry.collect():
        if metric.name == "tokenscaler_tokens":
            for sample in metric.samples:
                if sample.name == "tokenscaler_tokens_total" and sample.labels.get("type") == kind:
                    total += sample.value
    return total


def print_summary(
    rows: list[Row],
    stats: LoadStats,
    sidecars: list[Sidecar],
    models: list[SimulatedModel],
    scenario: Scenario,
    interrupted: bool,
) -> None:
    print()
    if not rows:
        print("stopped before the first poll")
        return
    cut = stats.sent - stats.ok - stats.failed
    ended = "by Ctrl-C" if interrupted else "at the end"
    print(f"requests: {stats.sent} sent, {stats.ok} answered, {stats.failed} failed, {cut} cut short {ended}")
    before = [r for r in rows if not r.phase and r.t < next((p.t for p in rows if p.phase), math.inf)]
    during = [r for r in rows if r.phase]
    for name, part in (("before the phase", before), (f"at the end of {scenario.label!r}", during)):
        if part:
            r = part[-1]
            print(
                f"{name} ({r.t:.0f}s): {r.arrivals_rps:.1f} req/s, {r.demand:.0f} weighted tokens/s; "
                f"HPA replicas by tokens {r.replicas}, by req/s {r.requests_replicas}"
            )
    if during and (peak := max(during, key=lambda r: r.queued + r.in_flight)):
        print(
            f"during {scenario.label!r} the model servers held up to {peak.queued} requests queued and "
            f"{peak.in_flight} in flight (at {peak.t:.0f}s)"
        )
    counted_p = sum(_sidecar_tokens(s, "prompt") for s in sidecars)
    counted_g = sum(_sidecar_tokens(s, "generation") for s in sidecars)
    served_p = sum(m.served_prompt for m in models)
    served_g = sum(m.served_generation for m in models)
    same = counted_p == served_p and counted_g == served_g
    print(
        f"token counts: sidecars {counted_p:.0f} prompt + {counted_g:.0f} generated; model servers' own "
        f"{served_p} + {served_g} -> "
        + (
            "equal"
            if same
            else f"differ: {cut} requests cut short {ended}"
            + ("" if interrupted else " (try a longer --duration)")
        )
    )
    print("everything stopped.")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="token-scaler demo", description=__doc__.split("\n\n")[0] if __doc__ else ""
    )
    parser.add_argument("--duration", type=float, default=60.0, help="seconds to run (default 60)")
    parser.add_argument(
        "--redis-url",
        type=redis_url_argument,
        default=os.environ.get("REDIS_URL"),
        help="use this Redis, a cluster or Sentinel's (env REDIS_URL)",
    )
    parser.add_argument("--rps", type=float, default=4.0, help="base requests/s of the load (default 4)")
    parser.add_argument("--replicas", type=int, default=4, help="simulated model-server replicas (default 4)")
    parser.add_argument(
        "--seed",
        type=int,
        default=1,
        help="seed of the load's arrival times, tenants and streaming choices (default 1): "
        "the same seed, the same load",
    )
    parser.add_argument(
        "--scenario",
        choices=sorted(SCENARIOS),
        default="longer",
        help="what happens in the middle of the load: "
        + "; ".join(f"{name!r}: {scenario.describe()}" for name, scenario in SCENARIOS.items())
        + " (default 'longer': tokens/s and requests/s disagree)",
    )
    parser.add_argument(
        "--from-zero",
        action="store_true",
        help="a workload at zero replicas behind a gateway: 0 -> N -> 0 (--replicas is then the maximum)",
    )
    parser.add_argument(
        "--cold-start", type=float, default=3.0, help="--from-zero: seconds a new replica takes to start"
    )
    args = parser.parse_args(argv)
    if args.duration < 15:
        parser.error("--duration must be at least 15 seconds")
    if args.rps <= 0 or args.replicas < 1:
        parser.error("--rps must be above 0 and --replicas at least 1")
    if args.from_zero:
        return asyncio.run(from_zero(args))
    return asyncio.run(run(args))


async def from_zero(args: argparse.Namespace) -> int:
    from demo.from_zero import WORKLOAD as FROM_ZERO
    from demo.from_zero import run_from_zero

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    redis_ = start_redis(args.redis_url)
    print(f"Redis: {redis_.description}")
    try:
        await forget(redis_.url, FROM_ZERO)
        return await run_from_zero(args, redis_.url)
    finally:
        with contextlib.suppress(*REDIS_ERRORS):  # a Redis of the user's that went away
            await forget(redis_.url, FROM_ZERO)
        if redis_.stop is not None:
            redis_.stop()


if __name__ == "__main__":
    sys.exit(main())
