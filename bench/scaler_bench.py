"""Scaler benchmarks: RPC latency, stream ingest, and freshness of a load step.

    python -m bench.scaler_bench latency    [--objects 1000 --concurrency 200 --seconds 15]
    python -m bench.scaler_bench ingest     [--sidecars 5000 --workloads 1000 --seconds 60]
    python -m bench.scaler_bench freshness  [--steps 5] [--prometheus]
    python -m bench.scaler_bench all

Freshness reports two times from the sidecars' first flush after a 3x step: ``first_change``,
when GetMetrics first moves by more than 1 % of the step (the steady value is exact, so this
is when post-step data is first counted), and ``ninety_percent``, when it reaches 90 % of the
step (the algorithm's reaction: the stable window's average, or panic mode).

Each compares with a baseline in the same run: ``latency`` with a constant-answer gRPC
server (the floor of Python gRPC on this machine), ``ingest`` with the rate the load
generator offered, ``freshness`` with Prometheus' ``rate()`` over a scrape of the same
counts (``--prometheus``, needs the ``prometheus`` binary). Results: printed and written
to bench/results/scaler-*.json. Uses REDIS_URL, else starts a private redis-server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from bench._common import Scaler, bucket_quantile, cpu_seconds, percentiles, redis_for_bench, rss_mib, save
from scaler._gen import externalscaler_pb2 as pb
from scaler._gen import externalscaler_pb2_grpc as pb_grpc
from token_scaler.record import APPEND_SCRIPT, ModelCounts, Record, append_args, seq_key, stream_key
from token_scaler.redis_conn import free_port, sync_client
from token_scaler.redis_topology import LocalCluster


def workload_name(i: int) -> str:
    return f"bench-{i:05d}/llm"


def metadata(i: int, port: int) -> dict[str, str]:
    return {
        "scalerAddress": f"127.0.0.1:{port}",
        "tokensPerSecondPerReplica": "1000",
        "workload": workload_name(i),
    }


class Appender:
    """Appends records through the contract's script in pipelines, as many sidecars would."""

    def __init__(self, url: str) -> None:
        self.client = sync_client(url)
        self.sha = self.client.script_load(APPEND_SCRIPT)
        self.seqs: dict[tuple[str, str], int] = {}

    def batch(self, rows: list[tuple[str, str, int, ModelCounts]]) -> None:
        pipe = self.client.pipeline(transaction=False)
        for workload, sidecar, ts, counts in rows:
            seq = self.seqs.get((workload, sidecar), 0) + 1
            self.seqs[(workload, sidecar)] = seq
            record = Record(sidecar, seq, ts, 1000, {"llm": counts})
            pipe.evalsha(
                self.sha, 2, stream_key(workload), seq_key(workload, sidecar), *append_args([record], 1200)
            )
        pipe.execute()

    def now_ms(self) -> int:
        sec, usec = self.client.time()
        return int(sec * 1000 + usec // 1000)


def populate(url: str, workloads: int, sidecars: int, seconds: int) -> None:
    appender = Appender(url)
    now = appender.now_ms()
    rng = random.Random(1)
    rows = []
    for w in range(workloads):
        for s in range(sidecars):
            for t in range(seconds, 0, -1):
                sg = rng.randrange(100, 600)
                rows.append(
                    (workload_name(w), f"pod-{s}", now - t * 1000, ModelCounts(sg // 3, sg, sg // 3, sg, 1))
                )
            if len(rows) >= 5000:
                appender.batch(rows)
                rows = []
    if rows:
        appender.batch(rows)


# -- latency -------------------------------------------------------------------------


async def _client(
    port: int, objects: int, concurrency: int, seconds: float, warm: bool, rate: float = 0.0
) -> dict[str, Any]:
    """Closed loop with ``concurrency`` callers, or open loop at ``rate`` calls/s when given."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.ExternalScalerStub(channel)
        refs = [
            pb.ScaledObjectRef(name="llm", namespace=f"bench-{i:05d}", scalerMetadata=metadata(i, port))
            for i in range(objects)
        ]
        if warm:  # KEDA's first poll of each ScaledObject: spec, then metrics (registers and backfills)
            for ref in refs:
                await stub.GetMetricSpec(ref, timeout=30)
                await stub.GetMetrics(
                    pb.GetMetricsRequest(scaledObjectRef=ref, metricName="token-demand"), timeout=30
                )
        latencies: list[float] = []
        errors = 0
        deadline = time.perf_counter() + seconds

        async def worker(seed: int) -> None:
            nonlocal errors
            rng = random.Random(seed)
            while time.perf_counter() < deadline:
                ref = refs[rng.randrange(objects)]
                request = pb.GetMetricsRequest(scaledObjectRef=ref, metricName="token-demand")
                started = time.perf_counter()
                try:
                    await stub.GetMetrics(request, timeout=3)
                except grpc.aio.AioRpcError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - started)

        async def one(ref: pb.ScaledObjectRef) -> None:
            nonlocal errors
            started = time.perf_counter()
            try:
                await stub.GetMetrics(
                    pb.GetMetricsRequest(scaledObjectRef=ref, metricName="token-demand"), timeout=3
                )
            except grpc.aio.AioRpcError:
                errors += 1
                return
            latencies.append(time.perf_counter() - started)

        if rate > 0:
            rng = random.Random(3)
            tasks = []
            start = time.perf_counter()
            for i in range(int(rate * seconds)):
                delay = start + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(refs[rng.randrange(objects)])))
            await asyncio.gather(*tasks)
        else:
            await asyncio.gather(*(worker(i) for i in range(concurrency)))
    summary = {k: v * 1000 if k != "n" else v for k, v in percentiles(latencies).items()}
    return {"latency_ms": summary, "calls_per_s": len(latencies) / seconds, "errors": errors}


def run_client(
    port: int, objects: int, concurrency: int, seconds: float, warm: bool, rate: float = 0.0
) -> dict[str, Any]:
    """The load runs in its own process, so it does not share the scaler's interpreter."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.scaler_bench",
            "_client",
            str(port),
            str(objects),
            str(concurrency),
            str(seconds),
            "1" if warm else "0",
            str(rate),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def latency(args: argparse.Namespace) -> dict[str, Any]:
    url, own = redis_for_bench()
    try:
        print(f"populating {args.objects} workloads x 2 sidecars x 60 s of history ...", flush=True)
        populate(url, args.objects, 2, 60)
        floor_port = free_port()
        floor = subprocess.Popen(
            [sys.executable, "-m", "bench._floor_scaler", str(floor_port)], stdout=subprocess.PIPE
        )
        assert floor.stdout is not None
        floor.stdout.readline()
        scaler = Scaler(url)
        try:
            result: dict[str, Any] = {
                "objects": args.objects,
                "concurrency": args.concurrency,
                "seconds": args.seconds,
            }
            print("warming the scaler: one KEDA poll per ScaledObject ...", flush=True)
            run_client(scaler.grpc_port, args.objects, 1, 0.01, True)
            before = scaler.histogram("tokenscaler_scaler_rpc_duration_seconds", 'method="GetMetrics"')
            for label, port in (("floor", floor_port), ("scaler", scaler.grpc_port)):
                print(
                    f"{label}: {args.concurrency} concurrent GetMetrics for {args.seconds}s ...", flush=True
                )
                result[label] = run_client(port, args.objects, args.concurrency, args.seconds, False)
            after = scaler.histogram("tokenscaler_scaler_rpc_duration_seconds", 'method="GetMetrics"')
            measured = {le: after[le] - before.get(le, 0.0) for le in after}
            result["scaler_handler_ms"] = {
                "p50_le": bucket_quantile(measured, 0.5) * 1000,
                "p99_le": bucket_quantile(measured, 0.99) * 1000,
                "p999_le": bucket_quantile(measured, 0.999) * 1000,
            }
            # KEDA-like load, open loop: 1,000 ScaledObjects, each polled every 30 s by KEDA
            # and every 15 s by the HPA's metrics path, is ~200 GetMetrics/s.
            print(f"open loop at {args.rate} calls/s ...", flush=True)
            result["floor_paced"] = run_client(floor_port, args.objects, 0, args.seconds, False, args.rate)
            result["scaler_paced"] = run_client(
                scaler.grpc_port, args.objects, 0, args.seconds, False, args.rate
            )
            for key, base_key in (("scaler", "floor"), ("scaler_paced", "floor_paced")):
                base = result[base_key]["latency_ms"]
                ours = result[key]["latency_ms"]
                result[key]["ratio_to_floor"] = {p: ours[p] / base[p] for p in ("p50", "p99")}
            result["scaler_rss_mib"] = rss_mib(scaler.proc.pid)
        finally:
            scaler.stop()
            floor.terminate()
            floor.wait()
    finally:
        if own:
            own.stop()
    return result


# -- ingest --------------------------------------------------------------------------


def ingest(args: argparse.Namespace) -> dict[str, Any]:
    """``--topology single`` (REDIS_URL or a private redis-server), ``cluster`` (a private
    3-master cluster, a replica each) or ``both``, one after the other in the same run."""
    if args.topology != "both":
        return _ingest_on(args.topology, args)
    result = {topology: _ingest_on(topology, args) for topology in ("single", "cluster")}
    single, cluster = result["single"], result["cluster"]
    result["cluster_over_single"] = {
        "scaler_cpu": cluster["scaler_cpu_share_of_one_core"] / single["scaler_cpu_share_of_one_core"],
        "applied_entries_per_s": cluster["applied_entries_per_s"] / single["applied_entries_per_s"],
    }
    return result


def _ingest_on(topology: str, args: argparse.Namespace) -> dict[str, Any]:
    if topology == "cluster":
        cluster = LocalCluster.start()
        try:
            return _ingest(cluster.url, args)
        finally:
            cluster.stop()
    url, own = redis_for_bench()
    try:
        return _ingest(url, args)
    finally:
        if own:
            own.stop()


def _ingest(url: str, args: argparse.Namespace) -> dict[str, Any]:
    scaler = Scaler(url)
    try:
        # KEDA asks about every workload once, so the scaler follows all of them.
        run_client(scaler.grpc_port, args.workloads, 4, 0.01, True)
        per_workload = args.sidecars // args.workloads
        sidecars = [
            (workload_name(w), f"pod-{s}") for w in range(args.workloads) for s in range(per_workload)
        ]
        appender = Appender(url)
        offered = 0
        samples: list[dict[str, float]] = []
        start_cpu = cpu_seconds(scaler.proc.pid)
        start_entries = scaler.metric("tokenscaler_scaler_stream_entries_total")
        started = time.monotonic()
        slices = 10  # spread each second's appends over 100 ms slices, as sidecars flush at any phase
        behind = 0.0
        for second in range(args.seconds):
            for part in range(slices):
                now = appender.now_ms()
                chunk = sidecars[part::slices]
                appender.batch([(w, s, now, ModelCounts(100, 300, 100, 300, 1)) for w, s in chunk])
                offered += len(chunk)
                wait = started + second + (part + 1) / slices - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                else:
                    behind = max(behind, -wait)
            if second % 10 == 9:
                samples.append(
                    {
                        "t_s": round(time.monotonic() - started, 1),
                        "cpu_share_of_one_core": (cpu_seconds(scaler.proc.pid) - start_cpu)
                        / (time.monotonic() - started),
                        "rss_mib": rss_mib(scaler.proc.pid),
                        "lag_entries": offered
                        - (scaler.metric("tokenscaler_scaler_stream_entries_total") - start_entries),
                    }
                )
                print(samples[-1], flush=True)
        elapsed = time.monotonic() - started
        time.sleep(1.0)
        applied = scaler.metric("tokenscaler_scaler_stream_entries_total") - start_entries
        result = {
            "sidecars": len(sidecars),
            "workloads": args.workloads,
            "seconds": args.seconds,
            "offered_entries_per_s": offered / elapsed,
            "applied_entries_per_s": applied / elapsed,
            "lag_after_1s": offered - applied,
            "generator_max_behind_s": behind,
            "scaler_cpu_share_of_one_core": (cpu_seconds(scaler.proc.pid) - start_cpu) / elapsed,
            "samples": samples,
        }
    finally:
        scaler.stop()
    return result


# -- freshness -----------------------------------------------------------------------


class StepLoad:
    """Four sidecars flushing every second at a rate that steps from ``low`` to ``high``."""

    def __init__(self, url: str, workload: str, low: int, high: int) -> None:
        self.appender = Appender(url)
        self.workload = workload
        self.rate = low
        self.low, self.high = low, high
        self.total = 0  # tokens counted so far, for the Prometheus exporter
        self.step_flush: float | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        next_at = time.monotonic()
        while not self.stop.is_set():
            now = self.appender.now_ms()
            per_pod = self.rate // 4
            self.appender.batch(
                [(self.workload, f"pod-{i}", now, ModelCounts(0, per_pod, 0, per_pod, 1)) for i in range(4)]
            )
            self.total += per_pod * 4
            if self.rate == self.high and self.step_flush is None:
                self.step_flush = time.monotonic()
            next_at += 1.0
            self.stop.wait(max(0.0, next_at - time.monotonic()))


def _watch(
    read: Any, low: float, high: float, t0: float, timeout: float, every: float
) -> dict[str, float | None]:
    first = ninety = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and ninety is None:
        value = read()
        now = time.monotonic()
        if first is None and value > low + 0.01 * (high - low):
            first = now - t0
        if value >= low + 0.9 * (high - low):
            ninety = now - t0
        time.sleep(every)
    return {"first_change_s": first, "ninety_percent_s": ninety}


def freshness(args: argparse.Namespace) -> dict[str, Any]:
    url, own = redis_for_bench()
    low, high = 4000, 12000  # tokens/s: a 3x step
    runs: list[dict[str, Any]] = []
    prom_runs: list[dict[str, Any]] = []
    try:
        scaler = Scaler(url)
        try:
            for step in range(args.steps):
                workload = f"fresh-{step}-{random.randrange(1 << 30):x}/llm"
                load = StepLoad(url, workload, low, high)
                load.thread.start()
                ns = workload.split("/")[0]
                meta = {"scalerAddress": "x", "tokensPerSecondPerReplica": "1300", "workload": workload}
                channel = grpc.insecure_channel(f"127.0.0.1:{scaler.grpc_port}")
                stub = pb_grpc.ExternalScalerStub(channel)
                ref = pb.ScaledObjectRef(name="llm", namespace=ns, scalerMetadata=meta)

                def read(stub: Any = stub, ref: Any = ref) -> float:
                    request = pb.GetMetricsRequest(scaledObjectRef=ref, metricName="token-demand")
                    return float(stub.GetMetrics(request, timeout=3).metricValues[0].metricValueFloat)

                time.sleep(args.warmup)
                print(f"step {step}: steady at {low} tokens/s -> {read():.0f}", flush=True)
                load.rate = high
                while load.step_flush is None:
                    time.sleep(0.005)
                runs.append(_watch(read, low, high, load.step_flush, 30, 0.05))
                print(f"  scaler: {runs[-1]}", flush=True)
                load.stop.set()
                load.thread.join()
                channel.close()
        finally:
            scaler.stop()
        if args.prometheus:
            prom_runs = prometheus_freshness(low, high, max(1, min(args.steps, 2)))
    finally:
        if own:
            own.stop()

    def summarize(rs: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key in ("first_change_s", "ninety_percent_s"):
            values = [r[key] for r in rs if r[key] is not None]
            out[key] = percentiles(values, (50, 100)) if values else None
            out[f"{key}_missed"] = sum(1 for r in rs if r[key] is None)
        return out

    result: dict[str, Any] = {"step_tokens_per_s": [low, high], "scaler": summarize(runs), "runs": runs}
    if prom_runs:
        result["prometheus_rate_1m_scrape_15s"] = summarize(prom_runs)
        result["prometheus_runs"] = prom_runs
    return result


def prometheus_freshness(low: int, high: int, steps: int) -> list[dict[str, Any]]:
    """The same step through the path users build today: a counter scraped every 15 s by
    Prometheus, read with ``sum(rate(tokens_total[1m]))``."""
    from prometheus_client import CollectorRegistry, Counter, start_http_server

    binary = shutil.which("prometheus")
    if binary is None:
        print("prometheus not on PATH (apt-get install prometheus): peer skipped", flush=True)
        return []
    registry = CollectorRegistry()
    counter = Counter("tokenscaler_tokens", "tokens", registry=registry)
    exporter_port, prom_port = free_port(), free_port()
    server, _ = start_http_server(exporter_port, addr="127.0.0.1", registry=registry)
    workdir = Path(tempfile.mkdtemp(prefix="bench-prom-"))
    prom = _start_prometheus(binary, workdir, exporter_port, prom_port)
    rate = [low]
    stop = threading.Event()

    def tick() -> None:
        while not stop.is_set():
            counter.inc(rate[0])
            stop.wait(1.0)

    threading.Thread(target=tick, daemon=True).start()
    read = _rate_query(prom_port)
    runs = []
    try:
        for step in range(steps):
            rate[0] = low
            print(f"prometheus step {step}: warming up 100 s at {low} tokens/s ...", flush=True)
            time.sleep(100)
            rate[0] = high
            runs.append(_watch(read, low, high, time.monotonic(), 150, 0.5))
            print(f"  prometheus: {runs[-1]}", flush=True)
    finally:
        stop.set()
        prom.terminate()
        prom.wait()
        server.shutdown()
        shutil.rmtree(workdir, ignore_errors=True)
    return runs


def _start_prometheus(binary: str, workdir: Path, exporter_port: int, port: int) -> subprocess.Popen[bytes]:
    """Prometheus on ``port``, scraping the exporter on ``exporter_port`` every 15 s."""
    (workdir / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 15s\n  evaluation_interval: 15s\n"
        "scrape_configs:\n  - job_name: sidecar\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{exporter_port}']\n"
    )
    return subprocess.Popen(
        [
            binary,
            f"--config.file={workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _rate_query(port: int) -> Callable[[], float]:
    """A reader of ``sum(rate(tokenscaler_tokens_total[1m]))`` from the Prometheus on ``port``
    (0 while it has no answer)."""
    query = urllib.parse.quote("sum(rate(tokenscaler_tokens_total[1m]))")

    def read() -> float:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{port}/api/v1/query?query={query}", timeout=3
            ) as r:
                data = json.loads(r.read())["data"]["result"]
            return float(data[0]["value"][1]) if data else 0.0
        except (OSError, KeyError, IndexError, ValueError):
            return 0.0

    return read


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_client":
        port, objects, concurrency, seconds, warm, rate = argv[1:7]
        result = asyncio.run(
            _client(int(port), int(objects), int(concurrency), float(seconds), warm == "1", float(rate))
        )
        print(json.dumps(result))
        return 0
    parser = argparse.ArgumentParser(prog="python -m bench.scaler_bench")
    parser.add_argument("what", choices=["latency", "ingest", "freshness", "all"])
    parser.add_argument("--objects", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--rate", type=float, default=200.0, help="calls/s of the open-loop latency run")
    parser.add_argument("--sidecars", type=int, default=5000)
    parser.add_argument("--workloads", type=int, default=1000)
    parser.add_argument("--ingest-seconds", type=int, default=60)
    parser.add_argument(
        "--topology", choices=["single", "cluster", "both"], default="single", help="ingest: which Redis"
    )
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument(
        "--warmup", type=float, default=65.0, help="steady seconds before each step (> the 60 s window)"
    )
    parser.add_argument(
        "--prometheus", action="store_true", help="also measure Prometheus rate() (needs prometheus)"
    )
    args = parser.parse_args(argv)
    todo = ["latency", "ingest", "freshness"] if args.what == "all" else [args.what]
    for what in todo:
        if what == "ingest":
            args.seconds, saved = args.ingest_seconds, args.seconds
        result = {"latency": latency, "ingest": ingest, "freshness": freshness}[what](args)
        if what == "ingest":
            args.seconds = saved
        result["machine"] = {"cpus": os.cpu_count()}
        path = save(f"scaler-{what}", result)
        print(json.dumps(result, indent=2))
        print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
