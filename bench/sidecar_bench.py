"""The sidecar's cost, measured against going direct to the model server in the same run.

    python -m bench.sidecar_bench                 # ~1 minute, loopback only
    python -m bench.sidecar_bench --soak 600      # plus a 10-minute memory soak

Processes: a fake OpenAI-compatible upstream (tests/sidecar/fake_upstream.py), the sidecar
(``token-scaler sidecar``, as users run it, writing to a private Redis), a bare aiohttp
proxy on uvloop (forwards, counts nothing: the floor of the sidecar's own stack), and nginx
as the floor of what any reverse proxy costs (when nginx is on PATH). The load generator is this
process. Phases, each run against every target in turn (rounds interleaved, so drift on a
shared machine hits all targets alike):

1. non-streamed chat at a fixed open-loop rate: latency p50/p99, added = target - direct;
   sidecar CPU per 1,000 requests;
2. streaming throughput: concurrent streams of many tokens, no delay: SSE events/s at the
   client and the sidecar's CPU seconds per event (its capacity on one core);
3. inter-token gaps: streams paced at a fixed gap; p50/p99 of the gaps the client sees;
4. optional soak: steady load, sidecar RSS at start and end.

LiteLLM is not measured (too heavy for this 2-core machine). Results: bench/results/sidecar.json.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from bench._common import cpu_seconds, percentiles, redis_for_bench, rss_mib, save
from token_scaler.redis_conn import free_port

CHAT = {
    "model": "bench",
    "messages": [{"role": "user", "content": "Tell me about tokens. " * 20}],
    "max_tokens": 16,
}

NGINX_CONF = """
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  upstream model {{ server 127.0.0.1:{upstream}; keepalive 128; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://model;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_request_buffering off;
    }}
  }}
}}
"""


def wait_http(url: str, proc: subprocess.Popen[bytes], what: str) -> None:
    import urllib.request

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError as exc:
            if getattr(exc, "code", None):  # an HTTP error status: it answers
                return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not start")


def run_upstream(port: int) -> None:
    """Entry point of the upstream process."""
    from tests.sidecar.fake_upstream import FakeUpstream

    async def serve() -> None:
        fake = FakeUpstream()
        await fake.start(port)
        await asyncio.Event().wait()

    asyncio.run(serve())


def run_bare_proxy(port: int, upstream: str) -> None:
    """The floor of an aiohttp proxy: forward and stream back, no parsing, no counting."""
    from aiohttp import web

    async def serve() -> None:
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)

        async def handle(request: web.Request) -> web.StreamResponse:
            body = await request.read()
            headers = {
                k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")
            }
            async with session.post(upstream + request.raw_path, data=body, headers=headers) as up:
                response = web.StreamResponse(status=up.status)
                response.content_type = up.content_type
                await response.prepare(request)
                async for chunk in up.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
                return response

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        await asyncio.Event().wait()

    import uvloop

    uvloop.run(serve())


class Processes:
    def __init__(self, use_nginx: bool, profile: str | None = None) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.redis_url, self.redis = redis_for_bench()
        self.tmp = Path(tempfile.mkdtemp(prefix="sidecar-bench-"))
        up = free_port()
        self.start([sys.executable, "-m", "bench.sidecar_bench", "--serve-upstream", str(up)])
        wait_http(f"http://127.0.0.1:{up}/metrics", self.procs[-1], "the upstream")
        self.targets = {"direct": f"http://127.0.0.1:{up}"}
        self.upstream_pid = self.procs[-1].pid
        port, admin = free_port(), free_port()
        env = {**os.environ, "REDIS_URL": self.redis_url, "TOKEN_SCALER_WORKLOAD": "bench/llm"}
        profiler = ["-m", "cProfile", "-o", profile] if profile else []
        self.start(
            [
                sys.executable, *profiler, "-m", "token_scaler.cli", "sidecar",
                "--upstream", f"http://127.0.0.1:{up}", "--host", "127.0.0.1",
                "--port", str(port), "--admin-port", str(admin),
                "--shutdown-delay", "0", "--log-level", "WARNING",
            ],
            env=env,
        )  # fmt: skip
        wait_http(f"http://127.0.0.1:{admin}/readyz", self.procs[-1], "the sidecar")
        self.sidecar_pid = self.procs[-1].pid
        self.admin = f"http://127.0.0.1:{admin}"
        self.targets["sidecar"] = f"http://127.0.0.1:{port}"
        bare = free_port()
        self.start([sys.executable, "-m", "bench.sidecar_bench", "--serve-bare-proxy", str(bare), str(up)])
        self.bare_pid = self.procs[-1].pid
        wait_http(f"http://127.0.0.1:{bare}/metrics", self.procs[-1], "the bare aiohttp proxy")
        self.targets["aiohttp"] = f"http://127.0.0.1:{bare}"
        self.nginx_pid: int | None = None
        if use_nginx and shutil.which("nginx"):
            nport = free_port()
            conf = self.tmp / "nginx.conf"
            conf.write_text(NGINX_CONF.format(dir=self.tmp, upstream=up, port=nport))
            self.start(["nginx", "-c", str(conf), "-e", str(self.tmp / "error.log")])
            wait_http(f"http://127.0.0.1:{nport}/metrics", self.procs[-1], "nginx")
            self.targets["nginx"] = f"http://127.0.0.1:{nport}"
            self.nginx_pid = self.procs[-1].pid

    @property
    def pids(self) -> dict[str, int | None]:
        return {"sidecar": self.sidecar_pid, "aiohttp": self.bare_pid, "nginx": self.nginx_pid}

    def start(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL))

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        if self.redis is not None:
            self.redis.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


def cpu_of(pid: int | None) -> float:
    """CPU seconds of a process and its children (nginx's worker does the work)."""
    if pid is None:
        return 0.0
    total = cpu_seconds(pid)
    children = Path(f"/proc/{pid}/task/{pid}/children")
    if children.exists():
        for child in children.read_text().split():
            total += cpu_seconds(int(child))
    return total


async def open_loop(session: aiohttp.ClientSession, url: str, rate: float, seconds: float) -> list[float]:
    """Requests started on a fixed schedule, whatever the answers take (no coordinated omission)."""
    loop = asyncio.get_running_loop()
    count = max(1, int(rate * seconds))
    start = loop.time() + 0.05
    latencies: list[float] = []

    async def one(i: int) -> None:
        await asyncio.sleep(max(0.0, start + i / rate - loop.time()))
        began = time.perf_counter()
        async with session.post(url + "/v1/chat/completions", json=CHAT) as response:
            await response.read()
            assert response.status == 200, response.status
        latencies.append(time.perf_counter() - began)

    await asyncio.gather(*(one(i) for i in range(count)))
    return latencies


async def stream(
    session: aiohttp.ClientSession, url: str, tokens: int, delay: float, on_event: Callable[[float], None]
) -> None:
    body = {**CHAT, "max_tokens": tokens, "stream": True}
    headers = {"X-Fake-Delay": str(delay)} if delay else {}
    async with session.post(url + "/v1/chat/completions", json=body, headers=headers) as response:
        assert response.status == 200
        async for line in response.content:
            if line.startswith(b"data: "):
                on_event(time.perf_counter())


async def throughput(
    session: aiohttp.ClientSession, url: str, streams: int, tokens: int
) -> tuple[int, float]:
    count = 0

    def seen(_: float) -> None:
        nonlocal count
        count += 1

    began = time.perf_counter()
    await asyncio.gather(*(stream(session, url, tokens, 0, seen) for _ in range(streams)))
    return count, time.perf_counter() - began


async def gaps(
    session: aiohttp.ClientSession, url: str, streams: int, tokens: int, delay: float
) -> list[float]:
    out: list[float] = []

    async def one() -> None:
        times: list[float] = []
        await stream(session, url, tokens, delay, times.append)
        # Skip the role chunk and the tail (finish, usage, [DONE]): token gaps only.
        content = times[1 : tokens + 1]
        out.extend(b - a for a, b in itertools.pairwise(content))

    await asyncio.gather(*(one() for _ in range(streams)))
    return out


def ms(stats: dict[str, float]) -> dict[str, float]:
    return {k: (round(v * 1000, 3) if k != "n" else v) for k, v in stats.items()}


async def bench(args: argparse.Namespace, procs: Processes) -> dict[str, Any]:
    result: dict[str, Any] = {"targets": list(procs.targets), "args": vars(args)}
    connector = aiohttp.TCPConnector(limit=256)
    async with aiohttp.ClientSession(connector=connector) as session:
        for url in procs.targets.values():  # warm connections and code paths
            await open_loop(session, url, 200, 1)

        # 1. Non-streamed latency at a fixed rate.
        latencies: dict[str, list[float]] = {name: [] for name in procs.targets}
        cpu = {"sidecar": 0.0, "aiohttp": 0.0, "nginx": 0.0, "upstream": 0.0}
        rounds = 3
        for _ in range(rounds):
            for name, url in procs.targets.items():
                pid = procs.pids.get(name)
                before, up_before = cpu_of(pid), cpu_of(procs.upstream_pid)
                latencies[name] += await open_loop(session, url, args.rate, args.seconds / rounds)
                if name in cpu:
                    cpu[name] += cpu_of(pid) - before
                if name == "direct":
                    cpu["upstream"] += cpu_of(procs.upstream_pid) - up_before
        direct = percentiles(latencies["direct"])
        phase1: dict[str, Any] = {"rate_per_s": args.rate}
        for name, samples in latencies.items():
            stats = percentiles(samples)
            phase1[name] = {"latency_ms": ms(stats)}
            if name != "direct":
                phase1[name]["added_ms"] = {
                    p: round((stats[p] - direct[p]) * 1000, 3) for p in ("p50", "p90", "p99")
                }
                phase1[name]["cpu_s_per_1000_requests"] = round(cpu[name] / len(samples) * 1000, 3)
        phase1["direct"]["upstream_cpu_s_per_1000_requests"] = round(
            cpu["upstream"] / len(latencies["direct"]) * 1000, 3
        )
        result["non_streamed"] = phase1

        # 2. Streaming throughput.
        phase2: dict[str, Any] = {"streams": args.streams, "tokens_per_stream": args.stream_tokens}
        for name, url in procs.targets.items():
            pid = procs.pids.get(name)
            before = cpu_of(pid)
            events, elapsed = await throughput(session, url, args.streams, args.stream_tokens)
            used = cpu_of(pid) - before
            phase2[name] = {"events": events, "events_per_s": round(events / elapsed)}
            if pid is not None:
                phase2[name]["cpu_s"] = round(used, 3)
                phase2[name]["events_per_cpu_s"] = round(events / used) if used > 0 else None
        result["streaming"] = phase2

        # 3. Inter-token gaps at a fixed pace.
        phase3: dict[str, Any] = {"streams": args.gap_streams, "gap_ms": args.gap_ms}
        gap_stats = {}
        for name, url in procs.targets.items():
            gap_stats[name] = percentiles(await gaps(session, url, args.gap_streams, 100, args.gap_ms / 1000))
            phase3[name] = {"gap_ms": ms(gap_stats[name])}
            if name != "direct":
                phase3[name]["delta_ms"] = {
                    p: round((gap_stats[name][p] - gap_stats["direct"][p]) * 1000, 3) for p in ("p50", "p99")
                }
        result["inter_token_gaps"] = phase3

        # 4. Memory under steady load.
        if args.soak > 0:
            rss = [rss_mib(procs.sidecar_pid)]
            loop = asyncio.get_running_loop()
            ends = loop.time() + args.soak
            while loop.time() < ends:
                await open_loop(session, procs.targets["sidecar"], args.rate / 2, 10)
                await throughput(session, procs.targets["sidecar"], 4, 500)
                rss.append(rss_mib(procs.sidecar_pid))
            result["soak"] = {"seconds": args.soak, "rss_mib": [round(r, 1) for r in rss]}
        result["sidecar_rss_mib"] = round(rss_mib(procs.sidecar_pid), 1)
    return result


def report(result: dict[str, Any]) -> None:
    one = result["non_streamed"]
    print(f"non-streamed chat at {one['rate_per_s']}/s (latency ms; added = target - direct)")
    for name in result["targets"]:
        lat = one[name]["latency_ms"]
        line = f"  {name:8} p50 {lat['p50']:7.3f}  p90 {lat['p90']:7.3f}  p99 {lat['p99']:7.3f}  n={lat['n']}"
        if "added_ms" in one[name]:
            added = one[name]["added_ms"]
            line += f"   added p50 {added['p50']:+.3f} p99 {added['p99']:+.3f}"
            line += f"   cpu {one[name]['cpu_s_per_1000_requests']:.3f} s/1000 req"
        print(line)
    print(f"  upstream itself: cpu {one['direct']['upstream_cpu_s_per_1000_requests']:.3f} s/1000 req")
    two = result["streaming"]
    print(f"streaming: {two['streams']} streams x {two['tokens_per_stream']} tokens, no delay")
    for name in result["targets"]:
        row = two[name]
        extra = (
            f"   proxy cpu {row['cpu_s']} s, {row['events_per_cpu_s']} events per cpu-second"
            if "cpu_s" in row
            else ""
        )
        print(f"  {name:8} {row['events_per_s']:>8} events/s at the client{extra}")
    three = result["inter_token_gaps"]
    print(f"inter-token gaps: {three['streams']} streams paced at {three['gap_ms']} ms")
    for name in result["targets"]:
        gap = three[name]["gap_ms"]
        delta = three[name].get("delta_ms")
        tail = f"   delta p50 {delta['p50']:+.3f} p99 {delta['p99']:+.3f}" if delta else ""
        print(f"  {name:8} p50 {gap['p50']:.3f}  p99 {gap['p99']:.3f}{tail}")
    if "soak" in result:
        rss = result["soak"]["rss_mib"]
        print(f"soak {result['soak']['seconds']} s: sidecar RSS {rss[0]} -> {rss[-1]} MiB (max {max(rss)})")
    print(f"sidecar RSS at the end: {result['sidecar_rss_mib']} MiB")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=float, default=500, help="non-streamed requests per second")
    parser.add_argument("--seconds", type=float, default=15, help="seconds of load per target (phase 1)")
    parser.add_argument("--streams", type=int, default=8, help="concurrent streams (phase 2)")
    parser.add_argument("--stream-tokens", type=int, default=5000, help="tokens per stream (phase 2)")
    parser.add_argument("--gap-streams", type=int, default=20, help="concurrent paced streams (phase 3)")
    parser.add_argument("--gap-ms", type=float, default=20, help="pace of the paced streams (phase 3)")
    parser.add_argument("--soak", type=float, default=0, help="seconds of soak (phase 4; 0 skips it)")
    parser.add_argument("--no-nginx", action="store_true", help="skip nginx even when installed")
    parser.add_argument("--profile", metavar="FILE", help="run the sidecar under cProfile, stats to FILE")
    parser.add_argument("--serve-upstream", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--serve-bare-proxy", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_upstream:
        run_upstream(args.serve_upstream)
        return 0
    if args.serve_bare_proxy:
        run_bare_proxy(int(args.serve_bare_proxy[0]), f"http://127.0.0.1:{args.serve_bare_proxy[1]}")
        return 0
    procs = Processes(use_nginx=not args.no_nginx, profile=args.profile)
    try:
        result = asyncio.run(bench(args, procs))
    finally:
        procs.stop()
    report(result)
    print(f"saved {save('sidecar', result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
