"""Throwaway Redis Cluster and Sentinel sets of ``redis-server`` processes on loopback, for
tests and benchmarks: a cluster of masters with one replica each, and a master with replicas
watched by sentinels. Nothing is kept on disk past ``stop``; every node logs to its own file
in the set's temporary directory, named in the errors.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from token_scaler.redis_conn import REDIS_ERRORS, free_port, stop_process

START_TIMEOUT_S = 30.0


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _binary(name: str) -> str:
    exe = shutil.which(name)
    if exe is None:
        raise FileNotFoundError(f"{name} is not on PATH (Debian: apt-get install redis-server)")
    return exe


@dataclass(frozen=True)
class Secured:
    """A password every node asks for and, with ``ca``, TLS on every port (clients, the cluster
    bus, replication) with a certificate for 127.0.0.1 that ``ca`` signed: ``tls_files``."""

    password: str
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    def conf(self) -> str:
        text = f"requirepass {self.password}\nmasterauth {self.password}\n"
        if self.ca is not None:
            text += (
                f"tls-cert-file {self.cert}\ntls-key-file {self.key}\ntls-ca-cert-file {self.ca}\n"
                "tls-auth-clients no\ntls-cluster yes\ntls-replication yes\n"
            )
        return text

    def cli_args(self) -> list[str]:
        args = ["-a", self.password, "--no-auth-warning"]
        return args + (["--tls", "--cacert", str(self.ca)] if self.ca is not None else [])


def tls_files(root: Path, password: str) -> Secured:
    """A throwaway CA and a server certificate for 127.0.0.1 it signed, made by ``openssl``."""
    openssl = _binary("openssl")
    root.mkdir(parents=True, exist_ok=True)
    ca, ca_key = root / "ca.pem", root / "ca.key"
    cert, key, csr, ext = root / "server.pem", root / "server.key", root / "server.csr", root / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for command in (
        ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca, "-days", "2",
         "-subj", "/CN=token-scaler test CA"],
        ["req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"],
        ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-out", cert,
         "-days", "2", "-extfile", ext],
    ):  # fmt: skip
        subprocess.run([openssl, *map(str, command)], check=True, capture_output=True, timeout=60)
    return Secured(password, ca, cert, key)


@dataclass
class Node:
    """One ``redis-server`` process (a data node or a sentinel) on a loopback port."""

    process: subprocess.Popen[bytes]
    port: int
    workdir: Path
    secured: Secured | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self, timeout_s: float = 1.0) -> redis.Redis:
        secured: dict[str, Any] = {}
        if self.secured is not None:
            secured["password"] = self.secured.password
            if self.secured.ca is not None:
                secured.update(ssl=True, ssl_ca_certs=str(self.secured.ca))
        return redis.Redis(
            port=self.port, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, **secured
        )

    def call(self, *args: str | int) -> Any:
        """One command, its reply as redis-py parses it."""
        client = self.client()
        try:
            return client.execute_command(*args)  # type: ignore[no-untyped-call]  # untyped upstream
        finally:
            client.close()

    def cut_replicas(self) -> None:
        """Stop feeding this master's replicas: what it takes from now on lives on it alone, as
        with a replica that lags (asynchronous replication), until it dies. Its replicas'
        links are closed and their attempts to sync again refused (an ACL rule)."""
        self.call("ACL", "SETUSER", "default", "-psync", "-sync")
        self.call("CLIENT", "KILL", "TYPE", "replica")

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: the node is gone at once, as a crashed host is (no shutdown save)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        stop_process(self.process)


def _start(
    root: Path,
    name: str,
    args: list[str],
    *,
    port: int | None = None,
    conf: str = "",
    secured: Secured | None = None,
) -> Node:
    port = port or free_port()
    workdir = root / name
    workdir.mkdir()
    config = workdir / "redis.conf"
    listen = f"port {port}\n"
    if secured is not None:
        listen = (f"port 0\ntls-port {port}\n" if secured.ca is not None else listen) + secured.conf()
    # a sentinel rewrites its configuration file, so every node gets one of its own
    config.write_text(
        f'{listen}bind 127.0.0.1\nsave ""\nappendonly no\ndir {workdir}\n'
        f"logfile {workdir / 'redis.log'}\n{conf}"
    )
    process = subprocess.Popen(
        [_binary("redis-server"), str(config), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    return Node(process, port, workdir, secured)


def _cluster_port() -> int:
    """A free port whose cluster bus port (10000 above) is free and valid too."""
    while True:
        port = free_port()
        if port + 10000 < 65536:
            with socket.socket() as sock:
                try:
                    sock.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port


def _log_tails(root: Path, lines: int = 5) -> str:
    tails = []
    for log in sorted(root.glob("*/redis.log")):
        tail = log.read_text(errors="replace").splitlines()[-lines:]
        tails.append(f"{log.parent.name}: " + " | ".join(tail))
    return "\n".join(tails)


def _wait(what: str, check: Callable[[], object], root: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            if check():
                return
        except REDIS_ERRORS:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{what} did not come up within {START_TIMEOUT_S:g}s; logs:\n{_log_tails(root)}"
            )
        time.sleep(0.05)


@dataclass
class LocalCluster:
    """A Redis Cluster: ``masters`` masters with one replica each, built by ``redis-cli --cluster``.

    ``node_timeout_ms`` is the cluster's failure detection time: a killed master's replica is
    promoted about twice this later."""

    nodes: list[Node]
    root: Path
    node_timeout_ms: int
    secured: Secured | None = None

    @property
    def url(self) -> str:
        secured = self.secured
        scheme = "rediss+cluster" if secured is not None and secured.ca is not None else "redis+cluster"
        auth = f":{secured.password}@" if secured is not None else ""
        return f"{scheme}://{auth}" + ",".join(node.address for node in self.nodes[:3]) + "/"

    @classmethod
    def start(
        cls, masters: int = 3, node_timeout_ms: int = 1000, *, secured: Secured | None = None
    ) -> LocalCluster:
        """``secured``: every node asks for a password, and with its ``ca`` speaks TLS only."""
        root = Path(tempfile.mkdtemp(prefix="token-scaler-cluster-"))
        conf = (
            "cluster-enabled yes\ncluster-config-file nodes.conf\n"
            f"cluster-node-timeout {node_timeout_ms}\n"
            # a replica whose master died is promoted however long ago it last heard from it
            "cluster-replica-validity-factor 0\n"
            # the other masters serve reads while a dead one's slots wait for their replica
            "cluster-allow-reads-when-down yes\n"
        )
        nodes: list[Node] = []
        cluster = cls(nodes, root, node_timeout_ms, secured)
        try:
            for i in range(masters * 2):
                nodes.append(_start(root, f"node{i}", [], port=_cluster_port(), conf=conf, secured=secured))
            for node in nodes:
                _wait(f"cluster node {node.address}", node.client().ping, root)
            subprocess.run(
                [
                    _binary("redis-cli"),
                    "--cluster",
                    "create",
                    *(node.address for node in nodes),
                    "--cluster-replicas",
                    "1",
                    "--cluster-yes",
                    *(secured.cli_args() if secured is not None else ()),
                ],
                check=True,
                capture_output=True,
                timeout=START_TIMEOUT_S,
            )
            _wait("the cluster", cluster.healthy, root)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def healthy(self) -> bool:
        """Every live node says the cluster is ok, and every slot has a live master."""
        live = [node for node in self.nodes if node.alive()]
        for node in live:
            info = node.call("CLUSTER", "INFO")
            text = info.decode() if isinstance(info, bytes) else str(info)
            if "cluster_state:ok" not in text:
                return False
        for node in live:
            info = node.client().info("replication")
            if info.get("role") == "slave" and info.get("master_link_status") != "up":
                return False
        ports = {node.port for node in live}
        return bool(live) and all(int(master[1]) in ports for _s, _e, master, *_ in self.slots(live[0]))

    @staticmethod
    def slots(node: Node) -> list[list[Any]]:
        """``CLUSTER SLOTS`` as ``node`` sees it: [start, end, [host, port, id], replicas...]."""
        reply: list[list[Any]] = node.call("CLUSTER", "SLOTS")
        return reply

    def masters(self) -> list[Node]:
        """The live nodes that serve slots as masters now."""
        found = []
        for node in self.nodes:
            if not node.alive():
                continue
            role = node.call("ROLE")
            if role[0] in (b"master", "master"):
                found.append(node)
        return found

    def master_of(self, key: str) -> Node:
        """The live master serving ``key``'s slot."""
        node = next(n for n in self.nodes if n.alive())
        slot = int(node.call("CLUSTER", "KEYSLOT", key))
        for start, end, master, *_ in self.slots(node):
            if int(start) <= slot <= int(end):
                return next(n for n in self.nodes if n.port == int(master[1]))
        raise RuntimeError(f"no master serves {key!r}")

    def wait_failover(self, dead: Node) -> None:
        """Until a replica of the killed ``dead`` serves its slots and the cluster is ok."""

        def promoted() -> bool:
            for node in self.nodes:
                if node.alive() and any(int(m[1]) == dead.port for _s, _e, m, *_ in self.slots(node)):
                    return False
            return self.healthy()

        _wait(f"failover of {dead.address}", promoted, self.root)

    def migrate(self, key: str, to: Node, pause_s: float = 0.0) -> int:
        """Move ``key``'s slot, its keys one at a time (``pause_s`` apart, so clients meet the
        slot half moved: ASK), to the master ``to``, as ``redis-cli --cluster reshard`` does;
        the keys moved."""
        source = self.master_of(key)
        slot = int(source.call("CLUSTER", "KEYSLOT", key))
        source_id, target_id = source.call("CLUSTER", "MYID"), to.call("CLUSTER", "MYID")
        to.call("CLUSTER", "SETSLOT", slot, "IMPORTING", _text(source_id))
        source.call("CLUSTER", "SETSLOT", slot, "MIGRATING", _text(target_id))
        moved = 0
        while keys := source.call("CLUSTER", "GETKEYSINSLOT", slot, 1):
            source.call("MIGRATE", "127.0.0.1", to.port, "", 0, 5000, "KEYS", *keys)
            moved += len(keys)
            time.sleep(pause_s)
        for node in self.masters():
            node.call("CLUSTER", "SETSLOT", slot, "NODE", _text(target_id))
        return moved

    def flush(self) -> None:
        for node in self.masters():
            node.client().flushall()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class LocalSentinel:
    """One master, ``replicas`` replicas and ``sentinels`` sentinels (quorum: a majority)
    naming it ``name``. A killed master is replaced about ``down_after_ms`` later."""

    master: Node
    replicas: list[Node]
    sentinels: list[Node]
    root: Path
    name: str = "tokenscaler"
    down_after_ms: int = 1000
    data: list[Node] = field(default_factory=list)

    @property
    def url(self) -> str:
        return "redis+sentinel://" + ",".join(s.address for s in self.sentinels) + f"/{self.name}"

    @classmethod
    def start(
        cls, replicas: int = 2, sentinels: int = 3, name: str = "tokenscaler", down_after_ms: int = 1000
    ) -> LocalSentinel:
        root = Path(tempfile.mkdtemp(prefix="token-scaler-sentinel-"))
        master = _start(root, "master", [])
        self = cls(master, [], [], root, name, down_after_ms)
        self.data.append(master)
        try:
            _wait(f"master {master.address}", master.client().ping, root)
            for i in range(replicas):
                replica = _start(root, f"replica{i}", [], conf=f"replicaof 127.0.0.1 {master.port}\n")
                self.replicas.append(replica)
                self.data.append(replica)
            quorum = sentinels // 2 + 1
            for i in range(sentinels):
                self.sentinels.append(
                    _start(
                        root,
                        f"sentinel{i}",
                        ["--sentinel"],
                        conf=(
                            f"sentinel monitor {name} 127.0.0.1 {master.port} {quorum}\n"
                            f"sentinel down-after-milliseconds {name} {down_after_ms}\n"
                            f"sentinel failover-timeout {name} {max(down_after_ms * 5, 5000)}\n"
                            f"sentinel parallel-syncs {name} {replicas}\n"
                        ),
                    )
                )
            _wait("the sentinel set", self.healthy, root)
        except BaseException:
            self.stop()
            raise
        return self

    def current_master(self) -> Node:
        """The node the sentinels name master now."""
        host, port = self.sentinels[0].call("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.name)
        del host
        return next(node for node in self.data if node.port == int(port))

    def healthy(self, *, replicas: bool = True) -> bool:
        """Each sentinel names a live master, and knows the other sentinels; with ``replicas``,
        every other live data node replicates it too."""
        master = self.current_master()
        if not master.alive():
            return False
        for sentinel in self.sentinels:
            if not sentinel.alive():
                continue
            state = sentinel.call("SENTINEL", "MASTER", self.name)
            fields = state if isinstance(state, dict) else dict(zip(state[::2], state[1::2], strict=True))
            if (
                int(fields[b"port"]) != master.port
                or int(fields[b"num-other-sentinels"]) < len(self.sentinels) - 1
            ):
                return False
            if b"o_down" in fields[b"flags"] or b"s_down" in fields[b"flags"]:
                return False
        for node in self.data if replicas else []:
            if node is master or not node.alive():
                continue
            info = node.client().info("replication")
            if info.get("master_port") != master.port or info.get("master_link_status") != "up":
                return False
        return True

    def wait_failover(self, dead: Node) -> None:
        def replaced() -> bool:
            # the replicas' move to the new master is the sentinels' business, not awaited
            return self.current_master() is not dead and self.healthy(replicas=False)

        _wait(f"failover of {dead.address}", replaced, self.root)

    def stop(self) -> None:
        for node in [*self.sentinels, *self.data]:
            node.stop()
        shutil.rmtree(self.root, ignore_errors=True)
