"""A real OpenAI-compatible model server for the end-to-end tests.

``llama_server`` (session scope) runs llama.cpp's ``llama-server`` with Gemma 3 270M on a
free loopback port and yields a :class:`LlamaServer` with its URLs and model name. The
binary and the model come from ``scripts/llama-server build`` (a cache outside the repo,
built on first use: about 10 minutes on 2 cores, instant afterwards).

Every test under ``tests/e2e/`` is marked ``e2e``: ``pytest -m "not e2e"`` leaves them
out, and ``TOKEN_SCALER_E2E=0`` skips them. Otherwise a server that cannot be built or
started FAILS the tests: CI must run this suite for real.

Tests record what llama-server reports in each response's ``timings`` with
:meth:`LlamaServer.record`; the session prints a summary of them at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from sidecar.config import SidecarConfig
from sidecar.server import Sidecar
from tests.conftest import delete_keys

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "llama-server"
MODEL_ALIAS = "gemma-3-270m"
CONTEXT = 2048
PARALLEL = 2
THREADS = 2
BUILD_TIMEOUT_S = float(os.environ.get("TOKEN_SCALER_LLAMA_BUILD_TIMEOUT", "3600"))
START_TIMEOUT_S = 120.0

_E2E_DIR = Path(__file__).resolve().parent
_recorded: list[Timings] = []


@dataclass(frozen=True)
class Timings:
    """llama-server's own figures for one completion (its ``timings`` object)."""

    prompt_n: int  # prompt tokens evaluated (those not served from the prompt cache)
    cache_n: int  # prompt tokens served from the prompt cache
    prompt_ms: float
    prompt_per_second: float
    predicted_n: int  # generated tokens
    predicted_ms: float
    predicted_per_second: float
    label: str = ""

    @classmethod
    def from_json(cls, timings: Mapping[str, Any], label: str = "") -> Timings:
        return cls(
            prompt_n=int(timings["prompt_n"]),
            cache_n=int(timings.get("cache_n", 0)),
            prompt_ms=float(timings["prompt_ms"]),
            prompt_per_second=float(timings["prompt_per_second"]),
            predicted_n=int(timings["predicted_n"]),
            predicted_ms=float(timings["predicted_ms"]),
            predicted_per_second=float(timings["predicted_per_second"]),
            label=label,
        )

    @classmethod
    def from_response(cls, response: Any, label: str = "") -> Timings:
        """From an ``openai`` SDK object (a completion or the last stream chunk) or a dict."""
        data = response if isinstance(response, Mapping) else (getattr(response, "model_extra", None) or {})
        timings = data.get("timings")
        if not isinstance(timings, Mapping):
            raise AssertionError(f"llama-server sent no timings in {response!r}")
        return cls.from_json(timings, label)


@dataclass
class LlamaServer:
    """A running llama-server."""

    base_url: str  # http://127.0.0.1:PORT (llama-server's own endpoints: /health, /metrics, ...)
    model: str  # the model name it answers to and reports
    port: int
    binary: Path
    model_path: Path
    log_path: Path
    process: subprocess.Popen[bytes] = field(repr=False)
    timings: list[Timings] = field(default_factory=list)

    @property
    def openai_base_url(self) -> str:
        """What to pass as ``base_url`` to ``openai.OpenAI``."""
        return f"{self.base_url}/v1"

    def record(self, response: Any, label: str = "") -> Timings:
        """Parses the ``timings`` of a response, keeps it for the session summary, returns it."""
        timings = Timings.from_response(response, label)
        self.timings.append(timings)
        _recorded.append(timings)
        return timings

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _enabled() -> bool:
    return os.environ.get("TOKEN_SCALER_E2E", "1").strip().lower() not in {"0", "false", "no", "off"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _E2E_DIR in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.e2e)


def _ensure_built(config: pytest.Config) -> tuple[Path, Path]:
    """Runs ``scripts/llama-server build`` and returns (binary, model).

    The script's progress (stderr) reaches the terminal line by line even while pytest
    captures output: a first build takes minutes and must not look like a hang."""
    capture = config.pluginmanager.getplugin("capturemanager")
    shown = capture.global_and_fixture_disabled() if capture else contextlib.nullcontext()
    tail: deque[str] = deque(maxlen=60)
    with (
        shown,
        subprocess.Popen(
            [str(SCRIPT), "build"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # a timeout stops the whole build: cmake and its compilers too
        ) as proc,
    ):
        timed_out = threading.Event()

        def stop_build() -> None:
            timed_out.set()
            os.killpg(proc.pid, signal.SIGKILL)

        watchdog = threading.Timer(BUILD_TIMEOUT_S, stop_build)
        watchdog.start()
        try:
            assert proc.stderr is not None and proc.stdout is not None
            for line in proc.stderr:  # the script prints its paths (stdout) only at the end
                tail.append(line)
                sys.stderr.write(line)
                sys.stderr.flush()
            stdout = proc.stdout.read()
            returncode = proc.wait()
        finally:
            watchdog.cancel()
    if timed_out.is_set():
        pytest.fail(f"scripts/llama-server build took longer than {BUILD_TIMEOUT_S:.0f} s", pytrace=False)
    if returncode != 0:
        pytest.fail(
            "could not build the real model server (scripts/llama-server build exited "
            f"{returncode}); set TOKEN_SCALER_E2E=0 to skip the end-to-end tests.\n"
            f"{''.join(tail)}",
            pytrace=False,
        )
    paths = dict(line.split("=", 1) for line in stdout.splitlines() if "=" in line)
    binary, model = Path(paths.get("binary", "")), Path(paths.get("model", ""))
    if not binary.is_file() or not model.is_file():
        pytest.fail(f"scripts/llama-server build printed no usable paths: {stdout!r}", pytrace=False)
    return binary, model


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _healthy(base_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base_url}/health", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=15)


def _start(binary: Path, model: Path, log_path: Path) -> LlamaServer:
    port = _free_port()
    command = [
        str(binary),
        "--model", str(model),
        "--alias", MODEL_ALIAS,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--ctx-size", str(CONTEXT),
        "--parallel", str(PARALLEL),
        "--threads", str(THREADS),
        "--threads-batch", str(THREADS),
        "--metrics",
        "--no-webui",
    ]  # fmt: skip
    log = log_path.open("wb")
    try:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    finally:
        log.close()
    server = LlamaServer(
        base_url=f"http://127.0.0.1:{port}",
        model=MODEL_ALIAS,
        port=port,
        binary=binary,
        model_path=model,
        log_path=log_path,
        process=process,
    )
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"llama-server exited with {process.returncode}:\n{server.log_tail()}")
        if _healthy(server.base_url):
            return server
        time.sleep(0.2)
    _stop(process)
    raise RuntimeError(
        f"llama-server did not answer /health within {START_TIMEOUT_S:.0f} s:\n{server.log_tail()}"
    )


@pytest.fixture(scope="session")
def llama_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LlamaServer]:
    if not _enabled():
        pytest.skip("TOKEN_SCALER_E2E=0: end-to-end tests against llama-server are off")
    binary, model = _ensure_built(request.config)
    log_dir = tmp_path_factory.mktemp("llama-server")
    server: LlamaServer | None = None
    errors: list[str] = []
    for attempt in range(3):  # the free port may be taken between choosing and binding it
        try:
            server = _start(binary, model, log_dir / f"server-{attempt}.log")
            break
        except RuntimeError as exc:
            errors.append(str(exc))
    if server is None:
        pytest.fail("llama-server would not start:\n" + "\n---\n".join(errors), pytrace=False)
    try:
        yield server
    finally:
        _stop(server.process)
        (log_dir / "timings.json").write_text(json.dumps([asdict(t) for t in server.timings], indent=1))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _recorded:
        return
    terminalreporter.section("llama-server timings")
    for t in _recorded:
        terminalreporter.write_line(
            f"{t.label or '-':<28} prompt {t.prompt_n:>4} tok (+{t.cache_n} cached) "
            f"{t.prompt_per_second:8.1f} tok/s | generated {t.predicted_n:>4} tok "
            f"{t.predicted_per_second:7.1f} tok/s"
        )
    # As llama-server counts: the first token of each answer comes with its prompt.
    steps = sum(max(t.predicted_n - 1, 0) for t in _recorded)
    gen_ms = sum(t.predicted_ms for t in _recorded)
    if gen_ms > 0:
        rate = steps / gen_ms * 1000
        terminalreporter.write_line(
            f"overall generation: {steps} decode steps in {gen_ms / 1000:.2f} s = {rate:.1f} tok/s"
        )


def sidecar_config(llama: LlamaServer, redis_url: str, workload: str, **overrides: Any) -> SidecarConfig:
    """A sidecar in front of ``llama`` on loopback ports of its own (started by the caller)."""
    settings: dict[str, Any] = {
        "workload": workload,
        "redis_url": redis_url,
        "upstream": llama.base_url,
        "host": "127.0.0.1",
        "port": 0,
        "admin_port": 0,
        "shutdown_delay_s": 0.0,
        "drain_timeout_s": 10.0,
        **overrides,
    }
    return SidecarConfig(**settings)


@contextlib.asynccontextmanager
async def guarded_sidecar(
    llama: LlamaServer,
    redis_url: str,
    workload: str,
    policy: Path,
    rules: Mapping[str, Any],
    **overrides: Any,
) -> AsyncIterator[tuple[Sidecar, str]]:
    """A sidecar in front of ``llama`` under a policy of ``rules`` in a scope of its own (written
    to ``policy``): (the sidecar, its scope); the scope's policy keys deleted at the end."""
    scope = f"e2e-{uuid.uuid4().hex[:8]}"
    await asyncio.to_thread(policy.write_text, yaml.safe_dump({"scope": scope, **rules}))
    sidecar = Sidecar(
        sidecar_config(llama, redis_url, workload, policy=policy, **overrides), CollectorRegistry()
    )
    await sidecar.start()
    try:
        yield sidecar, scope
    finally:
        await sidecar.stop()
        delete_keys(redis_url, f"tokenscaler:v1:{{policy:{scope}*")
