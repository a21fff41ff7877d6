"""Peak memory of the sidecar against request body size, and what a large body does to the others.

For each size a fresh sidecar process (in front of the fake model server) gets one chat
request whose body is that many MiB of small message objects (the shape that costs the most
memory per byte once parsed); its peak RSS (``VmHWM``) is read after the answer. The baseline,
in the same run, is a fresh sidecar after one small request. Then, for the default limit, four
such bodies at once while a small request goes every 10 ms: the small requests' latency
percentiles say whether the loop kept serving (with parsing on it, four 61 MB bodies held
every other request for seconds).

    python -m bench.body_memory                      # sizes 1, 4, 8 MiB, then four bodies at the limit
    python -m bench.body_memory --sizes 1 8 32       # results: bench/results/body_memory.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench._common import RESULTS, percentiles, redis_for_bench
from sidecar.config import OPTIONS
from token_scaler.redis_conn import free_port

MESSAGE = {"role": "user", "content": "x"}


def body_of(mib: float) -> bytes:
    count = int(mib * (1 << 20)) // (len(json.dumps(MESSAGE, separators=(",", ":"))) + 1)  # and a comma
    doc = {"model": "m", "max_tokens": 5, "messages": [MESSAGE] * count}
    return json.dumps(doc, separators=(",", ":")).encode()


def peak_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def wait_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    import socket

    for _ in range(300):
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError("did not start")


class Sidecar:
    def __init__(self, upstream: int, redis_url: str, max_body: int) -> None:
        self.port, admin = free_port(), free_port()
        argv = [sys.executable, "-m", "token_scaler.cli", "sidecar", "--workload", "bench/body"]
        argv += ["--upstream", f"http://127.0.0.1:{upstream}", "--redis-url", redis_url]
        argv += ["--port", str(self.port), "--admin-port", str(admin), "--host", "127.0.0.1"]
        argv += ["--max-body-bytes", str(max_body), "--log-level", "WARNING", "--shutdown-delay", "0"]
        self.proc = subprocess.Popen(argv)
        wait_port(self.port, self.proc)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


async def post(session: aiohttp.ClientSession, port: int, body: bytes) -> tuple[int, float]:
    started = time.perf_counter()
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as response:
        await response.read()
        return response.status, time.perf_counter() - started


async def one_body(sidecar: Sidecar, body: bytes) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session:
        status, seconds = await post(session, sidecar.port, body)
    return {"status": status, "seconds": round(seconds, 3), "peak_mib": round(peak_mib(sidecar.proc.pid), 1)}


async def four_at_once(sidecar: Sidecar, body: bytes) -> dict[str, Any]:
    small = body_of(0.0001)
    async with aiohttp.ClientSession() as session:
        for _ in range(20):  # warm: connections open, code paths run
            await post(session, sidecar.port, small)
        alone: list[float] = []
        for _ in range(100):  # the baseline: small requests with nothing else in flight
            alone.append((await post(session, sidecar.port, small))[1])
            await asyncio.sleep(0.01)
        large = [asyncio.create_task(post(session, sidecar.port, body)) for _ in range(4)]
        latencies: list[float] = []
        while not all(task.done() for task in large):
            latencies.append((await post(session, sidecar.port, small))[1])
            await asyncio.sleep(0.01)
        statuses = [task.result()[0] for task in large]
    return {
        "large_statuses": statuses,
        "small_latency_ms_alone": _ms(alone),
        "small_latency_ms": _ms(latencies),
        "peak_mib": round(peak_mib(sidecar.proc.pid), 1),
    }


def _ms(samples: list[float]) -> dict[str, float]:
    return {k: round(v * 1000, 1) if k != "n" else v for k, v in percentiles(samples).items()}


def start_upstream(port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "bench.body_memory", "--upstream", str(port)])


async def run(sizes: list[float], four: float | None) -> dict[str, Any]:
    redis_url, redis_server = redis_for_bench()
    upstream_port = free_port()
    upstream = start_upstream(upstream_port)
    default = int(OPTIONS["max_body_bytes"].default)
    results: dict[str, Any] = {"default_max_body_bytes": default, "sizes": {}}
    try:
        wait_port(upstream_port, upstream)
        limit = max(default, int(max(sizes) * (2 << 20)))
        for mib in [0.001, *sizes]:
            sidecar = Sidecar(upstream_port, redis_url, limit)
            try:
                row = await one_body(sidecar, body_of(mib))
            finally:
                sidecar.stop()
            results["sizes"][str(mib)] = row
            print(f"body {mib:>7g} MiB: status {row['status']}, {row['seconds']:.3f} s, ", end="")
            print(f"peak RSS {row['peak_mib']} MiB")
        each = four or default / (1 << 20) * 0.95
        sidecar = Sidecar(upstream_port, redis_url, max(default, int(each * (2 << 20))))
        try:
            results["four_at_default"] = await four_at_once(sidecar, body_of(each))
        finally:
            sidecar.stop()
        four = results["four_at_default"]
        print(f"four bodies of {each:g} MiB at once: {four}")
    finally:
        upstream.terminate()
        upstream.wait(10)
        if redis_server is not None:
            redis_server.stop()
    return results


def serve_upstream(port: int) -> None:
    """A model server that takes any body and answers a fixed completion with usage."""
    from aiohttp import web

    answer = {
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11},
    }

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response(answer)

    app = web.Application(client_max_size=1 << 31)
    app.router.add_post("/{tail:.*}", handle)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=float, nargs="+", default=[1.0, 4.0, 8.0])
    parser.add_argument("--upstream", type=int, help=argparse.SUPPRESS)
    parser.add_argument(
        "--four", type=float, help="MiB of each of the four bodies (default: 0.95 x the limit)"
    )
    args = parser.parse_args()
    if args.upstream:
        serve_upstream(args.upstream)
        return
    results = asyncio.run(run(args.sizes, args.four))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "body_memory.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {os.path.relpath(out)}")


if __name__ == "__main__":
    main()
