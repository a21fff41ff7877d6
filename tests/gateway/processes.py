"""Processes for the from-zero tests: gateways, model replicas (a fake model server + a real
sidecar, two processes), and a stand-in for KEDA + the HPA + the Deployment controller that
polls the scaler over gRPC as KEDA does and runs as many replicas as its answers imply."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from scaler._gen import externalscaler_pb2 as pb
from tests.keda import KedaClient
from token_scaler.redis_conn import free_port

ROOT = Path(__file__).parent.parent.parent


def _spawn(*args: str, log: Path) -> subprocess.Popen[bytes]:
    out = log.open("ab")
    try:
        return subprocess.Popen(
            [sys.executable, *args],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PYTHONFAULTHANDLER": "1"},
        )
    finally:
        out.close()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=0.5) as response:
            return bool(response.status == 200)
    except OSError:
        return False


async def wait_ready(url: str, proc: subprocess.Popen[bytes], what: str, within_s: float = 30.0) -> None:
    deadline = time.monotonic() + within_s
    while not await asyncio.to_thread(_answers, url):
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready within {within_s:g}s")
        await asyncio.sleep(0.05)


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, wait_s: float = 15.0) -> int | None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
    try:
        return proc.wait(timeout=wait_s)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)  # with PYTHONFAULTHANDLER: its stacks go to the log
        try:
            proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            proc.kill()
        return proc.wait()


@dataclass
class GatewayProcess:
    redis_url: str
    workload: str
    log: Path
    extra: tuple[str, ...] = ()
    port: int = field(default_factory=free_port)
    admin_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        self.proc = _spawn(
            "-m", "token_scaler.cli", "gateway",
            "--workload", self.workload, "--redis-url", self.redis_url, "--host", "127.0.0.1",
            "--port", str(self.port), "--admin-port", str(self.admin_port),
            "--shutdown-delay", "0", "--drain-timeout", "5", "--discovery-interval", "0.1",
            "--queue-timeout", "60", *self.extra,
            log=self.log,
        )  # fmt: skip
        await wait_ready(f"http://127.0.0.1:{self.admin_port}/readyz", self.proc, "the gateway")

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/metrics", timeout=3) as r:
            text = r.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                name = name.split("{", 1)[0]  # summed over the labels (workloads)
                out[name] = out.get(name, 0.0) + float(value)
        return out

    def debug(self) -> dict[str, Any]:
        """The gateway's ``/debug/replicas`` view."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/debug/replicas", timeout=3) as r:
            view: dict[str, Any] = json.load(r)
        return view

    def stop(self) -> int | None:
        return None if self.proc is None else stop(self.proc)


@dataclass
class ReplicaProcess:
    """A simulated model replica: the fake model server and a sidecar, each a process; or, with
    ``upstream``, a sidecar in front of a model server that runs already (llama-server)."""

    name: str
    redis_url: str
    workload: str
    log: Path
    capacity_tokens: int = 0
    upstream: str | None = None
    models: str = "fake"
    model_port: int = field(default_factory=free_port)
    port: int = field(default_factory=free_port)
    admin_port: int = field(default_factory=free_port)
    model: subprocess.Popen[bytes] | None = None
    sidecar: subprocess.Popen[bytes] | None = None
    started: float = 0.0  # when the stand-in started it (monotonic)
    ready: float = 0.0  # when its sidecar answered /readyz (and announced itself)

    async def start(self) -> None:
        self.started = time.monotonic()
        if self.upstream is None:
            self.model = _spawn(
                "-m", "tests.sidecar.fake_upstream", "--port", str(self.model_port), log=self.log
            )  # fmt: skip
        self.sidecar = _spawn(
            "-m", "token_scaler.cli", "sidecar",
            "--workload", self.workload, "--redis-url", self.redis_url, "--host", "127.0.0.1",
            "--upstream", self.upstream or f"http://127.0.0.1:{self.model_port}",
            "--port", str(self.port), "--admin-port", str(self.admin_port),
            "--advertise", f"http://127.0.0.1:{self.port}", "--models", self.models,
            "--capacity-tokens", str(self.capacity_tokens), "--sidecar-id", self.name,
            "--shutdown-delay", "0", "--drain-timeout", "5", "--log-level", "WARNING",
            log=self.log,
        )  # fmt: skip
        await wait_ready(f"http://127.0.0.1:{self.admin_port}/readyz", self.sidecar, f"sidecar {self.name}")
        self.ready = time.monotonic()

    def alive(self) -> bool:
        procs = (self.sidecar,) if self.upstream else (self.model, self.sidecar)
        return all(p is not None and p.poll() is None for p in procs)

    def kill(self) -> None:
        """The pod dies at once: no SIGTERM, no withdrawal, no drain."""
        for proc in (self.sidecar, self.model):
            if proc is not None:
                stop(proc, signal.SIGKILL)

    def stop(self) -> None:
        """Scale-down: SIGTERM to the sidecar (it withdraws and drains), then the model server."""
        if self.sidecar is not None:
            stop(self.sidecar)
        if self.model is not None:
            stop(self.model)


@dataclass
class Autoscaler:
    """KEDA + HPA + Deployment controller, as processes see them.

    KEDA: ``StreamIsActive`` (scale 0 -> 1 at once on ``true``) and a poll every ``poll_s``
    (GetMetricSpec -> GetMetrics -> IsActive, as ``tests.keda.KedaClient``); after
    ``cooldown_s`` without an active answer, 0 replicas. HPA: ``ceil(value / target)``
    within [1, max_replicas] while active, up at once, down to the highest recommendation of
    the last ``stabilization_s``. Deployment: starts or stops replicas to the desired
    count, and replaces a replica whose processes died.
    """

    channel: grpc.aio.Channel
    scaler_address: str
    workload: str
    metadata: dict[str, str]
    redis_url: str
    log: Path
    max_replicas: int = 3
    min_replicas: int = 0  # the ScaledObject's minReplicaCount
    poll_s: float = 0.5
    cooldown_s: float = 3.0
    stabilization_s: float = 3.0
    capacity_tokens: int = 0
    upstream: str | None = None  # every replica's model server, when one runs already
    models: str = "fake"
    replicas: list[ReplicaProcess] = field(default_factory=list)
    timeline: list[dict[str, Any]] = field(default_factory=list)
    activations: list[float] = field(default_factory=list)  # monotonic times StreamIsActive said true
    started_replicas: list[ReplicaProcess] = field(default_factory=list)
    _recommendations: list[tuple[float, int]] = field(default_factory=list)
    _last_active: float = -1e9
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _count: int = 0

    @property
    def namespace(self) -> str:
        return self.workload.split("/")[0]

    def keda(self) -> KedaClient:
        return KedaClient(self.channel, self.scaler_address)

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._stream()), asyncio.create_task(self._poll())]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for replica in self.replicas:
            await asyncio.to_thread(replica.stop)
        self.replicas.clear()

    async def _stream(self) -> None:
        ref = self.keda().ref(self.namespace, "llm", {"workload": self.workload, **self.metadata})
        stream = self.keda().stub.StreamIsActive(ref)
        async for answer in stream:
            assert isinstance(answer, pb.IsActiveResponse)
            if answer.result:
                now = time.monotonic()
                self.activations.append(now)
                self._last_active = now
                if not self.replicas:
                    await self.scale(1, "StreamIsActive")

    async def _poll(self) -> None:
        while True:
            answer = await self.keda().poll(
                self.namespace, "llm", {"workload": self.workload, **self.metadata}
            )
            now = time.monotonic()
            if answer.active:
                self._last_active = now
            hpa = min(self.max_replicas, max(1, math.ceil(answer.value / answer.target - 1e-9)))
            self._recommendations.append((now, hpa))
            self._recommendations = [
                (t, r) for t, r in self._recommendations if now - t <= self.stabilization_s
            ]
            if now - self._last_active > self.cooldown_s:
                desired = self.min_replicas
            elif not self.replicas:
                desired = hpa
            else:
                desired = max(self.min_replicas, *(r for _, r in self._recommendations))
            self.timeline.append(
                {
                    "t": round(now, 2),
                    "value": round(answer.value, 1),
                    "active": answer.active,
                    "desired": desired,
                }
            )
            await self.scale(desired, "poll")
            await asyncio.sleep(self.poll_s)

    async def scale(self, desired: int, why: str) -> None:
        async with self._lock:
            dead = [r for r in self.replicas if not r.alive()]
            for replica in dead:  # the Deployment replaces a pod that died
                self.replicas.remove(replica)
                await asyncio.to_thread(replica.kill)
            while len(self.replicas) > desired:
                replica = self.replicas.pop()
                await asyncio.to_thread(replica.stop)
            while len(self.replicas) < desired:
                self._count += 1
                replica = ReplicaProcess(
                    f"replica-{self._count}",
                    self.redis_url,
                    self.workload,
                    self.log,
                    capacity_tokens=self.capacity_tokens,
                    upstream=self.upstream,
                    models=self.models,
                )
                self.replicas.append(replica)
                self.started_replicas.append(replica)
                await replica.start()
