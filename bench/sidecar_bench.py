"""The sidecar's cost, measured against going direct to the model server in the same run.

    python -m bench.sidecar_bench                 # ~4 minutes (LiteLLM included), loopback only
    python -m bench.sidecar_bench --soak 600      # plus a 10-minute memory soak

Processes: a fake OpenAI-compatible upstream (tests/sidecar/fake_upstream.py), the sidecar
(``token-scaler sidecar``, as users run it, writing to a private Redis), a bare aiohttp
proxy on uvloop (forwards, counts nothing: the floor of the sidecar's own stack), nginx
as the floor of what any reverse proxy costs (when nginx is on PATH), and LiteLLM's proxy, the
token-accounting proxy users pick today (one worker, no database, no callbacks or telemetry, one
model routed to the fake upstream; installed by bench/litellm-setup into a venv of its own outside
the repo, skipped with the reason printed when that fails). The load generator is this process.
Phases, each run against every target in turn (rounds interleaved, so drift on a shared machine
hits all targets alike):

1. non-streamed chat at a fixed open-loop rate: latency p50/p99, added = target - direct;
   each proxy's CPU per 1,000 requests; when a target falls behind that rate (LiteLLM does at
   500/s here), the same again at --low-rate, so its added latency is also seen without queueing;
2. streaming throughput: concurrent streams of many tokens, no delay: SSE events/s at the
   client and each proxy's SSE events per CPU-second (its capacity on one core);
3. inter-token gaps: streams paced at a fixed gap; p50/p99 of the gaps the client sees;
4. optional soak: steady load, sidecar RSS at start and end.

A target that fails a phase (errors, time-outs, falling behind the fixed rate) is recorded as such,
not dropped. Results: bench/results/sidecar.json.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench._common import cpu_seconds, percentiles, redis_for_bench, rss_mib, save
from token_scaler.redis_conn import free_port

LITELLM_VENV = Path(os.environ.get("LITELLM_VENV", Path.home() / ".cache" / "token-scaler" / "litellm-venv"))
LITELLM_SETUP = Path(__file__).parent / "litellm-setup"

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

# One model on the fake upstream; no master key, database, UI, callbacks or telemetry. Client x-
# headers are forwarded, so the fake's X-Fake-Delay paces streams through it as through the others.
LITELLM_CONF = """
model_list:
  - model_name: {model}
    litellm_params:
      model: openai/{model}
      api_base: http://127.0.0.1:{upstream}/v1
      api_key: sk-bench
litellm_settings:
  telemetry: false
  callbacks: []
  success_callback: []
  failure_callback: []
general_settings:
  forward_client_headers_to_llm_api: true
"""

# uvicorn's access log off, as for the other targets.
LITELLM_LOG_CONF = """{
  "version": 1,
  "disable_existing_loggers": false,
  "handlers": {"stderr": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr"}},
  "loggers": {
    "uvicorn": {"handlers": ["stderr"], "level": "WARNING"},
    "uvicorn.access": {"handlers": ["stderr"], "level": "WARNING", "propagate": false}
  }
}
"""


def wait_http(url: str, proc: subprocess.Popen[bytes], what: str, timeout: float = 30) -> None:
    import urllib.request

    deadline = time.monotonic() + timeout
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


def litellm_binary(venv: Path) -> Path:
    """The venv's ``litellm``, installing it with bench/litellm-setup when it is not there yet."""
    binary = venv / "bin" / "litellm"
    if binary.exists():
        return binary
    print(f"installing LiteLLM's proxy into {venv} (bench/litellm-setup, a few minutes)", flush=True)
    done = subprocess.run(
        ["bash", str(LITELLM_SETUP)],
        env={**os.environ, "LITELLM_VENV": str(venv)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    if done.returncode != 0 or not binary.exists():
        tail = " | ".join(done.stderr.strip().splitlines()[-3:])
        raise RuntimeError(f"bench/litellm-setup failed ({done.returncode}): {tail}")
    return binary


class Processes:
    def __init__(self, use_nginx: bool, profile: str | None = None, litellm: Path | None = None) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.skipped: dict[str, str] = {}
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
        elif use_nginx:
            self.skipped["nginx"] = "nginx is not on PATH (apt-get install nginx)"
        self.litellm_pid: int | None = None
        if litellm is not None:
            try:
                self.start_litellm(litellm, up)
            except (OSError, RuntimeError) as exc:
                self.skipped["litellm"] = str(exc)
                print(f"LiteLLM skipped: {exc}", flush=True)

    def start_litellm(self, venv: Path, upstream: int) -> None:
        binary = litellm_binary(venv)
        port = free_port()
        conf, log_conf, log = (
            self.tmp / "litellm.yaml",
            self.tmp / "litellm-log.json",
            self.tmp / "litellm.log",
        )
        conf.write_text(LITELLM_CONF.format(model=CHAT["model"], upstream=upstream))
        log_conf.write_text(LITELLM_LOG_CONF)
        home = self.tmp / "litellm-home"
        home.mkdir()
        # A small environment of its own: none of this process's variables reach a third-party proxy.
        env = {
            "PATH": f"{binary.parent}:/usr/bin:/bin",
            "HOME": str(home),
            "LANG": "C.UTF-8",
            "LITELLM_TELEMETRY": "False",
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no fetch of the cost map at start-up
            "LITELLM_LOG": "ERROR",
        }
        self.start(
            [
                str(binary), "--config", str(conf), "--host", "127.0.0.1", "--port", str(port),
                "--num_workers", "1", "--telemetry", "False", "--log_config", str(log_conf),
                "--keepalive_timeout", "75",  # nginx's default: no stale pooled connections between phases
            ],
            env=env,
            log=log,
        )  # fmt: skip
        try:
            wait_http(f"http://127.0.0.1:{port}/health/liveliness", self.procs[-1], "LiteLLM", timeout=120)
        except RuntimeError as exc:
            self.procs.pop().kill()
            tail = " | ".join(log.read_text(errors="replace").strip().splitlines()[-3:])
            raise RuntimeError(f"{exc}: {tail}") from None
        self.targets["litellm"] = f"http://127.0.0.1:{port}"
        self.litellm_pid = self.procs[-1].pid

    @property
    def pids(self) -> dict[str, int | None]:
        return {
            "sidecar": self.sidecar_pid,
            "aiohttp": self.bare_pid,
            "nginx": self.nginx_pid,
            "litellm": self.litellm_pid,
        }

    def start(self, argv: list[str], env: dict[str, str] | None = None, log: Path | None = None) -> None:
        if log is None:
            self.procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL))
            return
        with log.open("wb") as out:
            self.procs.append(subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT))

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


@dataclass
class Load:
    """What one open-loop run got: latencies of the answered requests, failures by kind."""

    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0  # from the first scheduled request to the last answer


# A target that falls behind must not stall the run: past this a request counts as failed.
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=60)
FAILURES = (aiohttp.ClientError, TimeoutError)


def zipf_weights(tenants: int, zipf: float) -> list[float]:
    """Tenant k's weight, 1 / (k + 1) ** zipf."""
    return [1 / math.pow(k + 1, zipf) for k in range(tenants)]


def tenant_headers(count: int, tenants: int, zipf: float = 0.0) -> list[dict[str, str] | None]:
    """The ``X-Tenant-ID`` of each of ``count`` requests: t0, t1, ... in turn, or with ``zipf``
    drawn at random with tenant k weighted 1 / (k + 1) ** zipf (a few busy tenants and a long
    tail of rare ones; seeded, so every target gets the same sequence)."""
    if not tenants:
        return [None] * count
    if not zipf:
        return [{"X-Tenant-ID": f"t{i % tenants}"} for i in range(count)]
    drawn = random.Random(7).choices(range(tenants), weights=zipf_weights(tenants, zipf), k=count)
    return [{"X-Tenant-ID": f"t{k}"} for k in drawn]


async def open_loop(
    session: aiohttp.ClientSession,
    url: str,
    rate: float,
    seconds: float,
    tenants: int = 0,
    zipf: float = 0.0,
) -> Load:
    """Requests started on a fixed schedule, whatever the answers take (no coordinated omission);
    ``tenants``: spread them over that many tenants (``tenant_headers``)."""
    loop = asyncio.get_running_loop()
    count = max(1, int(rate * seconds))
    start = loop.time() + 0.05
    out = Load()
    headers = tenant_headers(count, tenants, zipf)

    async def one(i: int) -> None:
        await asyncio.sleep(max(0.0, start + i / rate - loop.time()))
        began = time.perf_counter()
        try:
            async with session.post(
                url + "/v1/chat/completions",
                json=CHAT,
                timeout=REQUEST_TIMEOUT,
                headers=headers[i],
            ) as response:
                await response.read()
        except FAILURES as exc:
            out.errors[type(exc).__name__] += 1
            return
        if response.status != 200:
            out.errors[f"HTTP {response.status}"] += 1
            return
        out.latencies.append(time.perf_counter() - began)

    await asyncio.gather(*(one(i) for i in range(count)))
    out.seconds = loop.time() - start
    return out


def is_token(line: bytes) -> bool:
    """An SSE event carrying generated text (the fake's tokens are "t0 ", "t1 ", ...)."""
    return b'"content":"t' in line or b'"content": "t' in line


async def stream(
    session: aiohttp.ClientSession,
    url: str,
    tokens: int,
    delay: float,
    on_event: Callable[[float, bytes], None],
) -> None:
    body = {**CHAT, "max_tokens": tokens, "stream": True}
    headers = {"X-Fake-Delay": str(delay)} if delay else {}
    async with session.post(url + "/v1/chat/completions", json=body, headers=headers) as response:
        response.raise_for_status()
        async for line in response.content:
            if line.startswith(b"data: "):
                on_event(time.perf_counter(), line)


async def throughput(
    session: aiohttp.ClientSession, url: str, streams: int, tokens: int
) -> tuple[int, float]:
    count = 0

    def seen(_: float, __: bytes) -> None:
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

        def seen(at: float, line: bytes) -> None:
            if is_token(line):
                times.append(at)

        # Token events only: not the role chunk nor the tail (finish, usage, [DONE]), which a
        # proxy may merge into a token event or drop (LiteLLM sends the role with the first token).
        await stream(session, url, tokens, delay, seen)
        out.extend(b - a for a, b in itertools.pairwise(times))

    await asyncio.gather(*(one() for _ in range(streams)))
    return out


def ms(stats: dict[str, float]) -> dict[str, float]:
    return {k: (round(v * 1000, 3) if k != "n" else v) for k, v in stats.items()}


def failed(exc: BaseException) -> dict[str, str]:
    return {"error": f"{type(exc).__name__}: {exc}"}


def falls_behind(phase: dict[str, Any], name: str) -> bool:
    """Answered under 95 % of the offered rate, or failed requests."""
    row = phase[name]
    return bool(row["answered_per_s"] < 0.95 * phase["rate_per_s"] or row["errors"])


async def fixed_rate(
    session: aiohttp.ClientSession, procs: Processes, rate: float, seconds: float
) -> dict[str, Any]:
    """Phase 1: every target at one open-loop rate, in interleaved rounds."""
    loads = {name: Load() for name in procs.targets}
    cpu = {name: 0.0 for name in procs.pids}
    cpu["upstream"] = 0.0
    rounds = 3
    for _ in range(rounds):
        for name, url in procs.targets.items():
            pid = procs.pids.get(name)
            before, up_before = cpu_of(pid), cpu_of(procs.upstream_pid)
            load = await open_loop(session, url, rate, seconds / rounds)
            loads[name].latencies += load.latencies
            loads[name].errors += load.errors
            loads[name].seconds += load.seconds
            if name in cpu:
                cpu[name] += cpu_of(pid) - before
            if name == "direct":
                cpu["upstream"] += cpu_of(procs.upstream_pid) - up_before
    direct = percentiles(loads["direct"].latencies)
    phase: dict[str, Any] = {"rate_per_s": rate}
    for name, load in loads.items():
        stats = percentiles(load.latencies)
        row: dict[str, Any] = {
            "latency_ms": ms(stats) if stats else None,
            # Below the offered rate: the target fell behind and the requests queued.
            "answered_per_s": round(len(load.latencies) / load.seconds, 1) if load.seconds else 0,
            "errors": dict(load.errors),
        }
        if name != "direct" and stats and direct:
            row["added_ms"] = {p: round((stats[p] - direct[p]) * 1000, 3) for p in ("p50", "p90", "p99")}
        if name in cpu and load.latencies:
            row["cpu_s_per_1000_requests"] = round(cpu[name] / len(load.latencies) * 1000, 3)
        phase[name] = row
    if loads["direct"].latencies:
        phase["direct"]["upstream_cpu_s_per_1000_requests"] = round(
            cpu["upstream"] / len(loads["direct"].latencies) * 1000, 3
        )
    return phase


async def bench(args: argparse.Namespace, procs: Processes) -> dict[str, Any]:
    result: dict[str, Any] = {
        "targets": list(procs.targets),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "skipped": procs.skipped,
    }
    connector = aiohttp.TCPConnector(limit=256)
    async with aiohttp.ClientSession(connector=connector) as session:
        for url in procs.targets.values():  # warm connections and code paths
            await open_loop(session, url, 200, 1)
        result.update(await non_streamed(session, args, procs))
        result["streaming"] = await streaming(session, args, procs)
        result["inter_token_gaps"] = await token_gaps(session, args, procs)
        if args.soak > 0:
            result["soak"] = await soak(session, args, procs)
        result["sidecar_rss_mib"] = round(rss_mib(procs.sidecar_pid), 1)
        if procs.litellm_pid is not None:
            result["litellm_rss_mib"] = round(rss_mib(procs.litellm_pid), 1)
    return result


async def non_streamed(
    session: aiohttp.ClientSession, args: argparse.Namespace, procs: Processes
) -> dict[str, Any]:
    """Phase 1: non-streamed latency at a fixed rate; again at a lower one when a target fell
    behind, so that its added latency is also measured where it is not queueing."""
    out = {"non_streamed": await fixed_rate(session, procs, args.rate, args.seconds)}
    behind = [name for name in procs.targets if falls_behind(out["non_streamed"], name)]
    if behind and 0 < args.low_rate < args.rate:
        print(f"{', '.join(behind)} fell behind at {args.rate:g}/s: again at {args.low_rate:g}/s", flush=True)
        out["non_streamed_low_rate"] = await fixed_rate(session, procs, args.low_rate, args.seconds)
    return out


async def streaming(
    session: aiohttp.ClientSession, args: argparse.Namespace, procs: Processes
) -> dict[str, Any]:
    """Phase 2: streaming throughput, and its CPU where the target's process is known."""
    out: dict[str, Any] = {"streams": args.streams, "tokens_per_stream": args.stream_tokens}
    for name, url in procs.targets.items():
        pid = procs.pids.get(name)
        before = cpu_of(pid)
        try:
            events, elapsed = await throughput(session, url, args.streams, args.stream_tokens)
        except FAILURES as exc:
            out[name] = failed(exc)
            continue
        used = cpu_of(pid) - before
        out[name] = {"events": events, "events_per_s": round(events / elapsed)}
        if pid is not None:
            out[name]["cpu_s"] = round(used, 3)
            out[name]["events_per_cpu_s"] = round(events / used) if used > 0 else None
    return out


async def token_gaps(
    session: aiohttp.ClientSession, args: argparse.Namespace, procs: Processes
) -> dict[str, Any]:
    """Phase 3: inter-token gaps at a fixed pace, each target's against the direct path's."""
    out: dict[str, Any] = {"streams": args.gap_streams, "gap_ms": args.gap_ms}
    stats: dict[str, dict[str, float]] = {}
    for name, url in procs.targets.items():
        try:
            samples = await gaps(session, url, args.gap_streams, 100, args.gap_ms / 1000)
        except FAILURES as exc:
            out[name] = failed(exc)
            continue
        stats[name] = percentiles(samples)
        out[name] = {"gap_ms": ms(stats[name])}
        if name != "direct" and stats[name] and stats.get("direct"):
            out[name]["delta_ms"] = {
                p: round((stats[name][p] - stats["direct"][p]) * 1000, 3) for p in ("p50", "p99")
            }
    return out


async def soak(session: aiohttp.ClientSession, args: argparse.Namespace, procs: Processes) -> dict[str, Any]:
    """Phase 4: the sidecar's memory under steady load, sampled every round of it."""
    rss = [rss_mib(procs.sidecar_pid)]
    errors: Counter[str] = Counter()
    loop = asyncio.get_running_loop()
    ends = loop.time() + args.soak
    while loop.time() < ends:
        errors += (await open_loop(session, procs.targets["sidecar"], args.rate / 2, 10)).errors
        await throughput(session, procs.targets["sidecar"], 4, 500)
        rss.append(rss_mib(procs.sidecar_pid))
    return {"seconds": args.soak, "rss_mib": [round(r, 1) for r in rss], "errors": dict(errors)}


def report_fixed_rate(result: dict[str, Any], one: dict[str, Any]) -> None:
    print(f"non-streamed chat at {one['rate_per_s']:g}/s (latency ms; added = target - direct)")
    for name in result["targets"]:
        row = one[name]
        lat = row["latency_ms"]
        if lat is None:
            print(f"  {name:8} no request answered")
        else:
            line = f"  {name:8} p50 {lat['p50']:7.3f}  p90 {lat['p90']:7.3f}  p99 {lat['p99']:7.3f}"
            line += f"  n={lat['n']}"
            if "added_ms" in row:
                added = row["added_ms"]
                line += f"   added p50 {added['p50']:+.3f} p99 {added['p99']:+.3f}"
            if "cpu_s_per_1000_requests" in row:
                line += f"   cpu {row['cpu_s_per_1000_requests']:.3f} s/1000 req"
            print(line)
        if falls_behind(one, name):
            print(
                f"  {'':8} fell behind: answered {row['answered_per_s']}/s of {one['rate_per_s']:g}/s"
                f" offered, failures {row['errors'] or 'none'}"
            )
    if "upstream_cpu_s_per_1000_requests" in one["direct"]:
        print(f"  upstream itself: cpu {one['direct']['upstream_cpu_s_per_1000_requests']:.3f} s/1000 req")


def report(result: dict[str, Any]) -> None:
    for name, reason in result["skipped"].items():
        print(f"{name} skipped: {reason}")
    report_fixed_rate(result, result["non_streamed"])
    if "non_streamed_low_rate" in result:
        report_fixed_rate(result, result["non_streamed_low_rate"])
    two = result["streaming"]
    print(f"streaming: {two['streams']} streams x {two['tokens_per_stream']} tokens, no delay")
    for name in result["targets"]:
        row = two[name]
        if "error" in row:
            print(f"  {name:8} failed: {row['error']}")
            continue
        extra = (
            f"   proxy cpu {row['cpu_s']} s, {row['events_per_cpu_s']} events per cpu-second"
            if "cpu_s" in row
            else ""
        )
        print(f"  {name:8} {row['events_per_s']:>8} events/s at the client{extra}")
    three = result["inter_token_gaps"]
    print(f"inter-token gaps: {three['streams']} streams paced at {three['gap_ms']} ms")
    for name in result["targets"]:
        if "error" in three[name]:
            print(f"  {name:8} failed: {three[name]['error']}")
            continue
        gap = three[name]["gap_ms"]
        delta = three[name].get("delta_ms")
        tail = f"   delta p50 {delta['p50']:+.3f} p99 {delta['p99']:+.3f}" if delta else ""
        print(f"  {name:8} p50 {gap['p50']:.3f}  p99 {gap['p99']:.3f}  n={gap['n']}{tail}")
    if "soak" in result:
        rss = result["soak"]["rss_mib"]
        errors = result["soak"]["errors"]
        print(
            f"soak {result['soak']['seconds']} s: sidecar RSS {rss[0]} -> {rss[-1]} MiB (max {max(rss)})"
            f", failures {errors or 'none'}"
        )
    print(f"sidecar RSS at the end: {result['sidecar_rss_mib']} MiB")
    if "litellm_rss_mib" in result:
        print(f"LiteLLM RSS at the end: {result['litellm_rss_mib']} MiB")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate", type=float, default=500, help="non-streamed requests per second")
    parser.add_argument("--seconds", type=float, default=15, help="seconds of load per target (phase 1)")
    parser.add_argument(
        "--low-rate",
        type=float,
        default=100,
        help="phase 1 again at this rate when a target falls behind --rate (0 skips it)",
    )
    parser.add_argument("--streams", type=int, default=8, help="concurrent streams (phase 2)")
    parser.add_argument("--stream-tokens", type=int, default=5000, help="tokens per stream (phase 2)")
    parser.add_argument("--gap-streams", type=int, default=20, help="concurrent paced streams (phase 3)")
    parser.add_argument("--gap-ms", type=float, default=20, help="pace of the paced streams (phase 3)")
    parser.add_argument("--soak", type=float, default=0, help="seconds of soak (phase 4; 0 skips it)")
    parser.add_argument("--no-nginx", action="store_true", help="skip nginx even when installed")
    parser.add_argument("--no-litellm", action="store_true", help="skip LiteLLM's proxy")
    parser.add_argument(
        "--litellm-venv",
        type=Path,
        default=LITELLM_VENV,
        help="venv holding LiteLLM's proxy, made by bench/litellm-setup when missing (default: %(default)s)",
    )
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
    procs = Processes(
        use_nginx=not args.no_nginx,
        profile=args.profile,
        litellm=None if args.no_litellm else args.litellm_venv,
    )
    try:
        result = asyncio.run(bench(args, procs))
    finally:
        procs.stop()
    report(result)
    print(f"saved {save('sidecar', result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
