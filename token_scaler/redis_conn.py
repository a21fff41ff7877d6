"""Redis connections, and a throwaway ``redis-server`` for tests and the demo."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote

import hiredis
import redis
import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.sentinel import Sentinel
from redis.connection import parse_url
from redis.exceptions import RedisClusterException

REDIS_ERRORS: tuple[type[Exception], ...] = (TimeoutError, redis.RedisError, RedisClusterException, OSError)
"""What a call to Redis raises when Redis is down, slow or refuses: redis-py's errors (the
channel's too, and the cluster client's that are not ``RedisError``: no node serves a slot), a
timeout of the caller's own (``asyncio.wait_for``) and socket errors. Every process catches this
one tuple where it survives a Redis failure."""

Client = aioredis.Redis | RedisCluster
"""What ``connect`` returns: one Redis (directly, or the master Sentinel names), or a cluster."""

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
SCHEMES = ("redis", "rediss", "unix", *CLUSTER_SCHEMES, *SENTINEL_SCHEMES)
DEFAULT_PORT = {"cluster": 6379, "sentinel": 26379}


class RedisUrlError(ValueError):
    """A Redis URL that cannot be used; the message names the URL (password hidden), ``reason``
    says what is wrong with it."""

    def __init__(self, shown: str, reason: str) -> None:
        super().__init__(f"{shown!r}: {reason}")
        self.reason = reason


@dataclass(frozen=True)
class RedisLocation:
    """Where Redis is, read from a URL by ``locate``.

    ``single``: one server (``redis://``, ``rediss://``, ``unix://``; ``url`` as given).
    ``cluster``: a Redis Cluster, ``redis+cluster://[user:password@]host:port,host:port/``:
    the nodes listed are where the cluster's map is first asked for (one is enough).
    ``sentinel``: the master Sentinel names, ``redis+sentinel://[user:password@]host:port,.../name``
    (sentinels' port 26379 by default); the credentials are the data nodes'.
    The ``rediss+`` forms use TLS to every node."""

    kind: Literal["single", "cluster", "sentinel"]
    url: str
    nodes: tuple[tuple[str, int], ...] = ()
    master: str = ""
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False

    def credentials(self) -> dict[str, Any]:
        found: dict[str, Any] = {}
        if self.username:
            found["username"] = self.username
        if self.password is not None:
            found["password"] = self.password
        if self.tls:
            found["ssl"] = True
        return found


def redact(url: str) -> str:
    """``url`` with its credentials replaced by ``***``, for messages and logs."""
    scheme, sep, rest = url.partition("://")
    netloc, slash, path = rest.partition("/")
    if not sep or "@" not in netloc:
        return url
    return f"{scheme}://***@{netloc.rsplit('@', 1)[1]}{slash}{path}"


def locate(url: str) -> RedisLocation:
    """Read a Redis URL of any supported form; ``RedisUrlError`` names the URL and what is wrong."""
    scheme, sep, rest = url.partition("://")
    shown = redact(url)
    if not sep or scheme not in SCHEMES:
        raise RedisUrlError(
            shown, "expected a redis://, rediss://, unix://, redis+cluster:// or redis+sentinel:// URL"
        )
    if scheme in ("redis", "rediss", "unix"):
        try:
            settings = parse_redis_url(url)
        except ValueError as exc:
            raise RedisUrlError(shown, str(exc)) from None
        if scheme != "unix" and not settings.get("host"):
            raise RedisUrlError(shown, "the URL names no host")
        return RedisLocation("single", url)
    kind: Literal["cluster", "sentinel"] = "cluster" if scheme in CLUSTER_SCHEMES else "sentinel"
    netloc, _, path = rest.partition("/")
    path, _, query = path.partition("?")
    if query:
        raise RedisUrlError(shown, f"options after '?' are not read in a {kind} URL")
    username = password = None
    if "@" in netloc:
        userinfo, netloc = netloc.rsplit("@", 1)
        user, has_password, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if has_password else None
    nodes = []
    for part in netloc.split(","):
        host, has_port, port_text = part.strip().rpartition(":") if ":" in part else (part.strip(), "", "")
        if not host:
            raise RedisUrlError(shown, f"expected host:port for every node, got {part!r}")
        port = DEFAULT_PORT[kind]
        if has_port:
            if not port_text.isdigit() or not 0 < int(port_text) < 65536:
                raise RedisUrlError(shown, f"{part!r} has no valid port (1-65535)")
            port = int(port_text)
        nodes.append((host.strip("[]"), port))
    path = path.strip("/")
    if kind == "cluster" and path not in ("", "0"):
        raise RedisUrlError(shown, f"a Redis Cluster has only database 0, the URL asks for {path!r}")
    if kind == "sentinel" and (not path or "/" in path):
        raise RedisUrlError(
            shown, "expected the master's name as the path (redis+sentinel://host:port/<name>)"
        )
    return RedisLocation(
        kind,
        url,
        tuple(nodes),
        path if kind == "sentinel" else "",
        username,
        password,
        scheme.startswith("rediss"),
    )


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


def connect(url: str, *, timeout_s: float = 2.0) -> Client:
    """An asyncio client with bounded timeouts, so a dead Redis fails fast instead of hanging.

    A cluster URL gives redis-py's ``RedisCluster`` (commands go to the master of their key's
    slot; MOVED, ASK and failovers refresh its map); a Sentinel URL the master Sentinel names,
    asked again whenever a connection to it fails (a failover)."""
    where = locate(url)
    timeouts: dict[str, Any] = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
    if where.kind == "cluster":
        return RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in where.nodes],
            **timeouts,
            **where.credentials(),
        )
    if where.kind == "sentinel":
        sentinel = Sentinel(list(where.nodes), sentinel_kwargs=dict(timeouts), **timeouts)
        master: aioredis.Redis = sentinel.master_for(
            where.master, retry_on_timeout=False, health_check_interval=10, **where.credentials()
        )
        return master
    client: aioredis.Redis = aioredis.Redis.from_url(
        url,
        **timeouts,
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
        client = sync_client(url, timeout_s=timeout_s)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except REDIS_ERRORS:
        return False


def sync_client(url: str, *, timeout_s: float = 5.0) -> redis.Redis | redis.RedisCluster:
    """A blocking client for any URL ``locate`` reads (command-line tools)."""
    where = locate(url)
    timeouts: dict[str, Any] = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
    if where.kind == "cluster":
        return redis.RedisCluster(
            startup_nodes=[redis.cluster.ClusterNode(host, port) for host, port in where.nodes],  # type: ignore[no-untyped-call]
            **timeouts,
            **where.credentials(),
        )
    if where.kind == "sentinel":
        sentinel = redis.sentinel.Sentinel(list(where.nodes), sentinel_kwargs=dict(timeouts), **timeouts)
        master: redis.Redis = sentinel.master_for(where.master, **where.credentials())
        return master
    return redis.Redis.from_url(url, **timeouts)


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
        stop_process(self.process)
        shutil.rmtree(self.workdir, ignore_errors=True)


def stop_process(process: subprocess.Popen[bytes], grace_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL if it has not ended within ``grace_s``."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
