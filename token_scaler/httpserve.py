"""What the sidecar and the gateway share as HTTP services: their common settings, the
listening sockets, the admin endpoints, the event loop, and a run until SIGTERM.

Each is a ``Service``: ``start()`` opens its ports and background tasks, ``stop()`` runs
its own shutdown order (its module says which). ``main`` loads nothing itself: the
component's ``main`` builds its config and hands over a coroutine that serves it.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from token_scaler import config as c
from token_scaler.errors import ConfigError

log = logging.getLogger(__name__)

# How long a stop waits for a cancelled background task before going on without it.
TASK_STOP_TIMEOUT_S = 5.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def event_loop(raw: str) -> str:
    choice = raw.strip().lower()
    if choice not in ("auto", "uvloop", "asyncio"):
        raise ValueError("expected auto, uvloop or asyncio")
    return choice


def log_level(raw: str) -> str:
    level = raw.strip().upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError("expected DEBUG, INFO, WARNING, ERROR or CRITICAL")
    return level


def service_options(*, port_help: str, admin_help: str, drain_help: str) -> dict[str, c.Option[Any]]:
    """The settings every service has: where it listens, its shutdown, its loop and logging."""
    return {
        "host": c.Option("--host", "TOKEN_SCALER_HOST", c.text, "0.0.0.0", "address both ports listen on"),
        "port": c.Option("--port", "TOKEN_SCALER_PORT", c.port, 8080, port_help),
        "admin_port": c.Option("--admin-port", "TOKEN_SCALER_ADMIN_PORT", c.port, 9100, admin_help),
        "shutdown_delay_s": c.Option(
            "--shutdown-delay",
            "TOKEN_SCALER_SHUTDOWN_DELAY",
            c.non_negative_float,
            5.0,
            "seconds between readiness 503 and closing the port on SIGTERM",
        ),
        "drain_timeout_s": c.Option(
            "--drain-timeout", "TOKEN_SCALER_DRAIN_TIMEOUT", c.non_negative_float, 60.0, drain_help
        ),
        "event_loop": c.Option(
            "--event-loop",
            "TOKEN_SCALER_EVENT_LOOP",
            event_loop,
            "auto",
            "auto (uvloop when installed), uvloop or asyncio",
        ),
        "log_level": c.Option("--log-level", "TOKEN_SCALER_LOG_LEVEL", log_level, "INFO", "logging level"),
    }


def bound_port(runner: web.BaseRunner) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple):
            return int(address[1])
    raise RuntimeError("the server is bound to no TCP address")


async def listen(app: web.Application, host: str, port: int, **runner: Any) -> tuple[web.BaseRunner, int]:
    """Serve ``app`` on host:port (0: a free port); (its runner, the port it got)."""
    app_runner = web.AppRunner(app, access_log=None, **runner)
    await app_runner.setup()
    await web.TCPSite(app_runner, host, port, backlog=1024).start()
    return app_runner, bound_port(app_runner)


def admin_app(
    registry: CollectorRegistry,
    readiness: Callable[[], Mapping[str, Any]],
    extra: Mapping[str, Handler] | None = None,
) -> web.Application:
    """``/metrics``, ``/healthz``, ``/readyz`` (``readiness()`` is its body; 503 unless its
    ``ready`` is true) and the ``extra`` GET routes."""

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        body = readiness()
        return web.json_response(dict(body), status=200 if body.get("ready") else 503)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    for path, handler in (extra or {}).items():
        app.router.add_get(path, handler)
    return app


async def end_task(task: asyncio.Task[None], timeout_s: float) -> None:
    """Cancel ``task`` and wait for it at most ``timeout_s``: a stop never hangs on a task
    that does not end (logged)."""
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=timeout_s)
    if not done:
        log.warning("background task %s did not stop within %gs", task.get_name(), timeout_s)


class Service(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


async def serve(service: Service) -> None:
    """Start ``service``, serve until SIGTERM or SIGINT, then stop it."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await service.start()
    # What start-up allocated lives as long as the process: keep it out of GC passes,
    # which would otherwise walk it on every full collection (latency spikes).
    gc.freeze()
    try:
        await stop.wait()
        log.info("shutting down: readiness off, draining")
    finally:
        await service.stop()


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop halves the event loop's share of each proxied request; asyncio's loop is the fallback."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError as exc:
        if choice == "uvloop":
            raise ConfigError("TOKEN_SCALER_EVENT_LOOP=uvloop but uvloop is not installed") from exc
        return None
    return uvloop.new_event_loop


def main(log_level: str, event_loop: str, run: Callable[[], Coroutine[Any, Any, None]]) -> int:
    """Log at ``log_level`` and run ``run()`` on the chosen event loop until it returns."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    with asyncio.Runner(loop_factory=loop_factory(event_loop)) as runner:
        runner.run(run())
    return 0
