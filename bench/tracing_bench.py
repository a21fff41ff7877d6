"""What tracing costs the sidecar: the same sidecar with tracing off, on at 100 % and at 1 %.

    nice -n 10 python -m bench.tracing_bench               # ~2.5 minutes, loopback only
    nice -n 10 python -m bench.tracing_bench --protocol http/protobuf

Processes: the fake upstream (tests/sidecar/fake_upstream.py), a private Redis, an OTLP
receiver (tests/otlp_receiver.py, a process of its own, so its work is nobody's measured
CPU) and four sidecars as users run them: ``off`` and ``off-b`` (no OTEL_* variable: the
same thing twice, their difference the noise band of the comparison), ``on-100``
(``OTEL_TRACES_SAMPLER=parentbased_always_on``: every request's two spans exported) and
``on-1`` (``parentbased_traceidratio``, 0.01: spans made for every request, 1 % recorded and
exported; the rest still pass a ``traceparent`` on). Non-streamed chat at a fixed open-loop
rate, rounds interleaved, each round after 1 s of unmeasured load. Reported: each sidecar's
CPU per 1,000 requests (its export thread included) and its ratio to ``off``, pooled and as
the median over rounds of each round's ratio; latency p50/p90/p99 and the difference to
``off``; the spans the receiver got. Results: bench/results/tracing.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from typing import Any

import aiohttp

from bench._common import cpu_seconds, percentiles, redis_for_bench, save
from bench.sidecar_bench import open_loop, wait_http
from token_scaler.redis_conn import free_port

ARMS: dict[str, dict[str, str]] = {
    "off": {},
    "on-100": {"OTEL_TRACES_SAMPLER": "parentbased_always_on"},
    "off-b": {},
    "on-1": {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.01"},
}


def serve_receiver(grpc_port: int, http_port: int, status_port: int) -> None:
    """The OTLP receiver, and a /spans count on ``status_port`` for the report."""
    from aiohttp import web

    from tests.otlp_receiver import OtlpReceiver

    receiver = OtlpReceiver(grpc_port=grpc_port, http_port=http_port).start()

    async def spans(_: web.Request) -> web.Response:
        return web.json_response({"spans": len(receiver.spans), "exports": receiver.exports})

    app = web.Application()
    app.router.add_get("/spans", spans)
    web.run_app(app, host="127.0.0.1", port=status_port, print=None)


async def bench(args: argparse.Namespace, targets: dict[str, str], pids: dict[str, int]) -> dict[str, Any]:
    latencies: dict[str, list[float]] = {name: [] for name in targets}
    rounds: list[dict[str, dict[str, float]]] = []
    cpu = dict.fromkeys(targets, 0.0)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256)) as session:
        for url in targets.values():
            await open_loop(session, url, args.rate, 1)  # warm up
        for _ in range(args.rounds):
            rounds.append({})
            for name, url in targets.items():
                await open_loop(session, url, args.rate, 1)  # unmeasured: steady traffic first
                before = cpu_seconds(pids[name])
                load = await open_loop(session, url, args.rate, args.seconds / args.rounds)
                used = cpu_seconds(pids[name]) - before
                cpu[name] += used
                assert not load.errors, f"{name}: {dict(load.errors)}"
                latencies[name] += load.latencies
                rounds[-1][name] = {**percentiles(load.latencies), "cpu_ms": used / len(load.latencies) * 1e3}
    result: dict[str, Any] = {"rate_per_s": args.rate, "args": vars(args)}
    for name, samples in latencies.items():
        result[name] = {k: (round(v * 1000, 3) if k != "n" else v) for k, v in percentiles(samples).items()}
        result[name]["cpu_s_per_1000_requests"] = round(cpu[name] / len(samples) * 1000, 3)
    base = result["off"]["cpu_s_per_1000_requests"]
    result["cpu_ratio"] = {name: round(result[name]["cpu_s_per_1000_requests"] / base, 3) for name in targets}
    result["cpu_ratio_median_over_rounds"] = {
        name: round(statistics.median(r[name]["cpu_ms"] / r["off"]["cpu_ms"] for r in rounds), 3)
        for name in targets
    }
    result["added_ms"] = {
        name: {p: round(result[name][p] - result["off"][p], 3) for p in ("p50", "p90", "p99")}
        for name in targets
    }
    result["rounds_cpu_ms_per_request"] = {
        name: [round(r[name]["cpu_ms"], 4) for r in rounds] for name in targets
    }
    return result


def main() -> int:
    args = _parser().parse_args()
    if args.serve_receiver:
        serve_receiver(*args.serve_receiver)
        return 0
    redis_url, server = redis_for_bench()
    procs: list[subprocess.Popen[bytes]] = []
    targets: dict[str, str] = {}
    pids: dict[str, int] = {}
    try:
        up = _start_upstream(procs)
        status, endpoint = _start_receiver(procs, args.protocol)
        for name, extra in ARMS.items():
            env = _sidecar_env(name, extra, redis_url, endpoint, args.protocol)
            targets[name], pids[name] = _start_sidecar(procs, name, env, up)
        result = asyncio.run(bench(args, targets, pids))
        for proc in procs[2:]:  # the sidecars send their last spans as they stop
            proc.terminate()
            proc.wait(timeout=20)
        time.sleep(0.5)
        result["receiver"] = _received(status)
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(timeout=20)
        if server is not None:
            server.stop()
    _report(args, targets, result)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=float, default=200, help="non-streamed requests per second")
    parser.add_argument("--seconds", type=float, default=30, help="seconds of measured load per sidecar")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds")
    parser.add_argument("--protocol", choices=("grpc", "http/protobuf"), default="grpc")
    parser.add_argument("--serve-receiver", type=int, nargs=3, help=argparse.SUPPRESS)
    return parser


def _start_upstream(procs: list[subprocess.Popen[bytes]]) -> int:
    """The fake upstream, appended to ``procs`` once started; its port."""
    up = free_port()
    procs.append(subprocess.Popen([sys.executable, "-m", "bench.sidecar_bench", "--serve-upstream", str(up)]))
    wait_http(f"http://127.0.0.1:{up}/metrics", procs[-1], "the upstream")
    return up


def _start_receiver(procs: list[subprocess.Popen[bytes]], protocol: str) -> tuple[str, str]:
    """The OTLP receiver, appended to ``procs``; its /spans URL and the endpoint of ``protocol``."""
    grpc_port, http_port, status_port = free_port(), free_port(), free_port()
    receiver_argv = [sys.executable, "-m", "bench.tracing_bench", "--serve-receiver"]
    procs.append(subprocess.Popen([*receiver_argv, str(grpc_port), str(http_port), str(status_port)]))
    status = f"http://127.0.0.1:{status_port}/spans"
    wait_http(status, procs[-1], "the OTLP receiver")
    return status, f"http://127.0.0.1:{grpc_port if protocol == 'grpc' else http_port}"


def _sidecar_env(
    name: str, extra: dict[str, str], redis_url: str, endpoint: str, protocol: str
) -> dict[str, str]:
    """The arm's environment: no OTEL_* variable of this process; the arm's own, if any."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env = {**clean, "REDIS_URL": redis_url, "TOKEN_SCALER_WORKLOAD": "bench/llm"}
    if extra:
        env |= {
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
            "OTEL_SERVICE_NAME": f"bench-{name}",
            **extra,
        }
    return env


def _start_sidecar(
    procs: list[subprocess.Popen[bytes]], name: str, env: dict[str, str], up: int
) -> tuple[str, int]:
    """A sidecar in front of the upstream, appended to ``procs`` once ready; its URL and pid."""
    port, admin = free_port(), free_port()
    argv = [
        sys.executable, "-m", "token_scaler.cli", "sidecar", "--upstream", f"http://127.0.0.1:{up}",
        "--host", "127.0.0.1", "--port", str(port), "--admin-port", str(admin),
        "--shutdown-delay", "0", "--log-level", "WARNING",
    ]  # fmt: skip
    procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL))
    wait_http(f"http://127.0.0.1:{admin}/readyz", procs[-1], name)
    return f"http://127.0.0.1:{port}", procs[-1].pid


def _received(status: str) -> Any:
    """The receiver's span and export counts."""
    import json
    import urllib.request

    with urllib.request.urlopen(status, timeout=5) as answer:
        return json.load(answer)


def _report(args: argparse.Namespace, targets: dict[str, str], result: dict[str, Any]) -> None:
    print(f"non-streamed chat at {args.rate:g}/s, {args.rounds} interleaved rounds, OTLP {args.protocol}")
    for name in targets:
        row, added = result[name], result["added_ms"][name]
        print(
            f"  {name:7} CPU {row['cpu_s_per_1000_requests']:.3f} s/1000 requests"
            f" (x{result['cpu_ratio'][name]:.3f} of off; median over rounds"
            f" x{result['cpu_ratio_median_over_rounds'][name]:.3f})"
            f"  latency p50 {row['p50']:.3f} p90 {row['p90']:.3f} p99 {row['p99']:.3f} ms"
            f" (p50 {added['p50']:+.3f} p99 {added['p99']:+.3f})  n={row['n']}"
        )
    print(f"  receiver: {result['receiver']['spans']} spans in {result['receiver']['exports']} exports")
    path = save("tracing", result)
    print(f"saved {path}")


if __name__ == "__main__":
    sys.exit(main())
