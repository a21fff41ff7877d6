"""Helpers shared by the benchmarks: percentiles, Redis, processes, CPU and memory readings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from token_scaler.redis_conn import LocalRedis, answers, free_port

RESULTS = Path(__file__).parent / "results"


def percentiles(samples: Sequence[float], points: Sequence[float] = (50, 90, 99, 99.9)) -> dict[str, float]:
    if not samples:
        return {}
    ordered = sorted(samples)
    out = {}
    for p in points:
        index = min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))
        out[f"p{p:g}"] = ordered[index]
    out["max"] = ordered[-1]
    out["n"] = len(ordered)
    return out


def redis_for_bench() -> tuple[str, LocalRedis | None]:
    """REDIS_URL, else a private redis-server (a bench must not disturb a shared one)."""
    url = os.environ.get("REDIS_URL")
    if url and answers(url):
        return url, None
    server = LocalRedis.start()
    return server.url, server


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Scaler:
    """``token-scaler serve`` as a separate process, as users run it (benchmarks and tests)."""

    def __init__(self, redis_url: str, *extra: str, capture: bool = False) -> None:
        self.grpc_port = free_port()
        self.http_port = free_port()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "token_scaler.cli",
                "serve",
                "--host",
                "127.0.0.1",
                "--grpc-port",
                str(self.grpc_port),
                "--http-port",
                str(self.http_port),
                "--redis-url",
                redis_url,
                "--debug-open",
                "true",
                *(() if capture else ("--log-level", "WARNING")),
                *extra,
            ],
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.STDOUT if capture else None,
        )
        deadline = time.monotonic() + 30
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                output = self.proc.stdout.read().decode() if capture and self.proc.stdout else ""
                self.stop()
                raise RuntimeError(f"the scaler did not start: {output}")
            time.sleep(0.1)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/readyz", timeout=1) as r:
                return bool(r.status == 200)
        except OSError:
            return False

    def debug(self, workload: str) -> dict[str, Any]:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.http_port}/debug/scalers/{workload}", timeout=3
        ) as r:
            body: dict[str, Any] = json.loads(r.read())
            return body

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/metrics", timeout=5) as r:
            total = 0.0
            for line in r.read().decode().splitlines():
                if line.startswith(name + " ") or line.startswith(name + "{"):
                    total += float(line.rsplit(" ", 1)[1])
            return total

    def histogram(self, name: str, label: str) -> dict[float, float]:
        buckets: dict[float, float] = {}
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/metrics", timeout=5) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(f"{name}_bucket{{") and label in line:
                    le = line.split('le="', 1)[1].split('"', 1)[0]
                    buckets[float(le)] = float(line.rsplit(" ", 1)[1])
        return buckets

    def stop(self) -> int:
        """SIGTERM, and the exit code."""
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(timeout=15)


def bucket_quantile(buckets: dict[float, float], q: float) -> float:
    """Upper bound of the bucket holding quantile ``q`` (histogram_quantile without interpolation)."""
    total = buckets.get(float("inf"), 0.0)
    for le in sorted(buckets):
        if buckets[le] >= q * total:
            return le
    return float("inf")


def save(name: str, result: dict[str, object]) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path
