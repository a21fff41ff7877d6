"""Redis connections, and a throwaway ``redis-server`` for tests and the demo."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hiredis
import redis
import redis.asyncio as aioredis
from redis.connection import parse_url

REDIS_ERRORS: tuple[type[Exception], ...] = (TimeoutError, redis.RedisError, OSError)
"""What a call to Redis raises when Redis is down, slow or refuses: redis-py's errors (the
channel's too), a timeout of the caller's own (``asyncio.wait_for``) and socket errors. Every
process catches this one tuple where it survives a Redis failure."""


class PackedConnection(aioredis.Connection):
    """A plain TCP connection that packs commands with hiredis' C packer.

    redis-py's asyncio connection packs every argument in Python; on the request path of the
    sidecar's policies (a script call with ~20 arguments per request) that was a quarter of
    the policy's CPU. Multi-word command names ("SCRIPT LOAD") are split as redis-py does.
    """

    def pack_command(self, *args: Any) -> list[bytes]:
        if (isinstance(args[0], str) and " " in args[0]) or (isinstance(args[0], bytes) and b" " in args[0]):
            args = (*args[0].split(), *args[1:])
        return [hiredis.pack_command(args)]


def parse_redis_url(url: str) -> dict[str, Any]:
    """redis-py's own reading of a Redis URL (``redis.connection.parse_url``): host, port,
    path, db, credentials, query options, and ``connection_class`` unless plain TCP."""
    settings: dict[str, Any] = parse_url(url)  # type: ignore[no-untyped-call]  # untyped upstream
    return settings


def connection_class(url: str) -> dict[str, Any]:
    """``connection_class`` for ``from_url``: the packed one for plain ``redis://`` URLs; TLS and
    Unix sockets keep redis-py's own."""
    return {} if "connection_class" in parse_redis_url(url) else {"connection_class": PackedConnection}


def connect(url: str, *, timeout_s: float = 2.0) -> aioredis.Redis:
    """An asyncio client with bounded timeouts, so a dead Redis fails fast instead of hanging."""
    client: aioredis.Redis = aioredis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry_on_timeout=False,
        health_check_interval=10,
        **connection_class(url),
    )
    return client


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def answers(url: str, timeout_s: float = 0.5) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except REDIS_ERRORS:
        return False


@dataclass
class LocalRedis:
    """A ``redis-server`` child process on a free loopback port, keeping nothing on disk."""

    process: subprocess.Popen[bytes]
    port: int
    workdir: Path
    password: str | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def socket(self) -> Path:
        """Its Unix socket (also listening there)."""
        return self.workdir / "redis.sock"

    @classmethod
    def start(
        cls, port: int | None = None, binary: str | None = None, password: str | None = None
    ) -> LocalRedis:
        exe = binary or shutil.which("redis-server")
        if exe is None:
            raise FileNotFoundError("redis-server is not on PATH")
        port = port or free_port()
        workdir = Path(tempfile.mkdtemp(prefix="token-scaler-redis-"))
        process = subprocess.Popen(
            [
                exe,
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(workdir),
                "--logfile",
                str(workdir / "redis.log"),
                "--unixsocket",
                str(workdir / "redis.sock"),
                *(["--requirepass", password] if password else []),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # its own session: a Ctrl-C at the terminal reaches its parent, which stops it
            # in order, and not the server under the parent's last writes
            start_new_session=True,
        )
        server = cls(process, port, workdir, password)
        deadline = time.monotonic() + 10
        while not answers(server.url):
            if process.poll() is not None or time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"redis-server did not start on port {port}; see {workdir}/redis.log")
            time.sleep(0.02)
        return server

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.workdir, ignore_errors=True)
