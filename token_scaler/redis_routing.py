"""The policies' pipelined channel (redis_channel.py) to a Redis Cluster or to the master
Sentinel names: one ``Channel`` per master, commands routed by their key.

``open_channel(url)`` gives a ``Channel`` for one Redis, a ``ClusterChannel`` for a
``redis+cluster://`` URL and a ``SentinelChannel`` for a ``redis+sentinel://`` one; all three
take the same calls (``send``, ``evalsha``, ``reset``, ``close``), so the policy store never
knows which (``Commands``).

Cluster: the map of slots to masters comes from ``CLUSTER SLOTS`` (asked of any node that
answers, the URL's first). A command goes to the master of its key's slot (a script's first
key: every script touches keys of one slot, the tenant's or the model's hash tag); keyless
commands (PING, TIME) to the master of slot 0. Commands to one master still leave in one
write. Replies redirect: ``MOVED`` updates the slot's master, sends the command there and asks
for the whole map again; ``ASK`` (a slot being migrated) sends ``ASKING`` and the command to
the node named, once; ``TRYAGAIN`` (a script whose keys a migration has split between two
nodes) sends it again ``TRYAGAIN_S`` later, up to ``REDIRECTS`` times. A connection error (a
master gone) fails the commands waiting on it, as with one Redis (the policies decide without
Redis meanwhile), and asks for the map again, at most every ``REFRESH_S``, until a replica has
been promoted and the map says so.

Sentinel: the master's address comes from the first sentinel that answers
(``SENTINEL GET-MASTER-ADDR-BY-NAME``). When a connection to it fails, or it answers
``READONLY`` (it was demoted, a failover happened), the sentinels are asked again and a new
master gets a channel of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable, Sequence
from typing import Any

from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from token_scaler.redis_channel import Arg, Channel, Deliver, LuaScript, converting
from token_scaler.redis_conn import RedisLocation, locate

log = logging.getLogger(__name__)

SLOTS = 16384
REFRESH_S = 0.25  # the least time between two readings of the map (or asking the sentinels)
ASK_TIMEOUT_S = 1.0  # for a node's answer to CLUSTER SLOTS, a sentinel's to its master's address
REDIRECTS = 5  # redirects followed for one command before its caller gets the last reply
TRYAGAIN_S = 0.02  # the wait before a command Redis answered TRYAGAIN is sent again
KEYLESS = frozenset({"PING", "TIME", "SCRIPT", "INFO", "ECHO"})


def open_channel(url: str) -> Channel | ClusterChannel | SentinelChannel:
    """A pipelined channel to the Redis ``url`` names, in any form ``redis_conn.locate`` reads."""
    where = locate(url)
    if where.kind == "cluster":
        return ClusterChannel(where)
    if where.kind == "sentinel":
        return SentinelChannel(where)
    return Channel.from_url(url)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _key_of(args: Sequence[Arg]) -> Arg | None:
    return args[1] if len(args) > 1 and _text(args[0]).upper() not in KEYLESS else None


def _slot(key: Arg) -> int:
    raw = key if isinstance(key, bytes) else str(key).encode()
    slot: int = key_slot(raw)
    return slot


Run = Callable[[Channel, Deliver, bool], None]  # queues a command on a node's channel
_Waiting = tuple[Arg | None, Run, Deliver, int]  # key, run, deliver, redirects so far


class _Routed:
    """Commands sent to the channel of a node a subclass picks; replies and errors may send
    them elsewhere (``_redirect``) or ask for the topology again (``_stale``)."""

    def __init__(self, where: RedisLocation) -> None:
        self._where = where
        self._ssl = ssl.create_default_context() if where.tls else None
        self._nodes: dict[str, Channel] = {}
        self._waiting: list[_Waiting] = []  # commands waiting for a topology
        self._refreshing: asyncio.Task[None] | None = None
        self._last_refresh = -1e9
        self._closed = False

    # -- the calls the store makes

    def send(self, *args: Arg, flush: bool = False) -> asyncio.Future[Any]:
        return self.send_keyed(_key_of(args), *args, flush=flush)

    def send_keyed(self, key: Arg | None, *args: Arg, flush: bool = False) -> asyncio.Future[Any]:
        """``send`` routed by ``key``: for a command whose first key is not its first argument
        (``XREAD``); None for a keyless one."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._dispatch(
            key,
            lambda node, deliver, f: node.enqueue(args, deliver, f),
            converting(future, None),
            flush,
        )
        return future

    def evalsha(
        self,
        script: LuaScript,
        keys: Sequence[Arg],
        args: Sequence[Arg],
        *,
        convert: Callable[[Any], Any] | None = None,
        flush: bool = False,
    ) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        command = ("EVALSHA", script.sha, len(keys), *keys, *args)

        def run(node: Channel, deliver: Deliver, f: bool) -> None:
            node.run_script(script, command, deliver, f, wanted=lambda: not future.done())

        self._dispatch(keys[0] if keys else None, run, converting(future, convert), flush)
        return future

    def reset(self) -> None:
        for node in self._nodes.values():
            node.reset()
        self._stale()

    async def close(self) -> None:
        self._closed = True
        if self._refreshing is not None:
            self._refreshing.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._refreshing
        for node in self._nodes.values():
            await node.close()
        waiting, self._waiting = self._waiting, []
        for _key, _run, deliver, _redirects in waiting:
            deliver(None, RedisConnectionError("the Redis channel is closed"))

    # -- routing

    def _dispatch(
        self,
        key: Arg | None,
        run: Run,
        deliver: Deliver,
        flush: bool,
        redirects: int = 0,
    ) -> None:
        if self._closed:
            deliver(None, RedisConnectionError("the Redis channel is closed"))
            return
        address = self._address(key)
        if address is None:  # no topology yet: sent once it is known
            self._waiting.append((key, run, deliver, redirects))
            self._stale(now=True)
            return

        def routed(reply: Any, error: BaseException | None) -> None:
            if error is not None:
                self._stale()
            elif (
                isinstance(reply, ResponseError)
                and redirects < REDIRECTS
                and self._redirect(key, str(reply), run, deliver, redirects)
            ):
                return
            deliver(reply, error)

        run(self._node(address), routed, flush)

    def _node(self, address: str) -> Channel:
        node = self._nodes.get(address)
        if node is None:
            host, _, port = address.rpartition(":")
            node = self._nodes[address] = Channel(
                host=host,
                port=int(port),
                username=self._where.username,
                password=self._where.password,
                ssl_context=self._ssl,
            )
        return node

    def _address(self, key: Arg | None) -> str | None:
        raise NotImplementedError

    def _redirect(self, key: Arg | None, error: str, run: Run, deliver: Deliver, redirects: int) -> bool:
        """Whether the error reply ``error`` sent the command elsewhere."""
        return False

    # -- the topology

    def _stale(self, *, now: bool = False) -> None:
        """Read the topology again (soon, at most every ``REFRESH_S``)."""
        if self._closed or self._refreshing is not None:
            return
        wait = 0.0 if now else max(0.0, self._last_refresh + REFRESH_S - time.monotonic())
        self._refreshing = asyncio.get_running_loop().create_task(self._refresh_after(wait))

    async def _refresh_after(self, wait: float) -> None:
        try:
            if wait:
                await asyncio.sleep(wait)
            error: Exception | None = None
            try:
                await self._refresh()
            except Exception as exc:  # every node down: what waits fails, as with one Redis
                error = exc
            self._last_refresh = time.monotonic()
        finally:
            self._refreshing = None
        waiting, self._waiting = self._waiting, []
        for key, run, deliver, redirects in waiting:
            if error is None:
                self._dispatch(key, run, deliver, True, redirects)
            else:
                deliver(None, RedisConnectionError(f"no Redis node answered: {error}"))

    async def _refresh(self) -> None:
        raise NotImplementedError

    async def _ask(self, address: str, *command: Arg) -> Any:
        """One command to ``address`` on a channel of its own (a node or a sentinel)."""
        host, _, port = address.rpartition(":")
        probe = Channel(
            host=host,
            port=int(port),
            ssl_context=self._ssl,
            connect_timeout_s=ASK_TIMEOUT_S,
            **self._probe_credentials(),
        )
        try:
            async with asyncio.timeout(ASK_TIMEOUT_S):
                reply = await probe.send(*command, flush=True)
        finally:
            await probe.close()
        if isinstance(reply, Exception):
            raise reply
        return reply

    def _probe_credentials(self) -> dict[str, Any]:
        return {"username": self._where.username, "password": self._where.password}


class ClusterChannel(_Routed):
    """Policies' commands to a Redis Cluster: see the module's docstring."""

    def __init__(self, where: RedisLocation) -> None:
        super().__init__(where)
        self._slots: list[str] | None = None  # slot -> "host:port" of its master

    def _address(self, key: Arg | None) -> str | None:
        if self._slots is None:
            return None
        return self._slots[_slot(key) if key is not None else 0]

    def _redirect(self, key: Arg | None, error: str, run: Run, deliver: Deliver, redirects: int) -> bool:
        kind, _, rest = error.partition(" ")
        if kind == "TRYAGAIN":  # a script's keys are split by a slot migration: again shortly
            asyncio.get_running_loop().call_later(
                TRYAGAIN_S, self._dispatch, key, run, deliver, True, redirects + 1
            )
            return True
        if kind not in ("MOVED", "ASK"):
            if kind == "CLUSTERDOWN":
                self._stale()
            return False
        slot_text, _, address = rest.partition(" ")
        if kind == "MOVED":
            if self._slots is not None:
                self._slots[int(slot_text)] = address
            self._stale()
            self._dispatch(key, run, deliver, True, redirects + 1)
            return True
        node = self._node(address)
        node.enqueue(("ASKING",), lambda reply, error: None, False)
        run(node, deliver, True)  # once: a further redirect reaches the caller
        return True

    async def _refresh(self) -> None:
        known = [*self._nodes, *(f"{host}:{port}" for host, port in self._where.nodes)]
        last: Exception | None = None
        for address in dict.fromkeys(known):
            try:
                reply = await self._ask(address, "CLUSTER", "SLOTS")
            except Exception as exc:
                last = exc
                continue
            slots = list(self._slots or [""] * SLOTS)
            asked_host = address.rpartition(":")[0]
            for start, end, master, *_ in reply:
                host = _text(master[0]) or asked_host
                for slot in range(int(start), int(end) + 1):
                    slots[slot] = f"{host}:{int(master[1])}"
            if "" in slots:
                last = RedisConnectionError(f"{address} maps no master to some slots")
                continue
            self._slots = slots
            return
        raise last or RedisConnectionError("no cluster node to ask")


class SentinelChannel(_Routed):
    """Policies' commands to the master Sentinel names: see the module's docstring."""

    def __init__(self, where: RedisLocation) -> None:
        super().__init__(where)
        self._master: str | None = None

    def _address(self, key: Arg | None) -> str | None:
        return self._master

    def _redirect(self, key: Arg | None, error: str, run: Run, deliver: Deliver, redirects: int) -> bool:
        if error.startswith("READONLY"):  # a demoted master: the command did not run
            self._master = None
            self._dispatch(key, run, deliver, True, redirects + 1)
            return True
        return False

    def _probe_credentials(self) -> dict[str, Any]:
        return {}  # the URL's credentials are the data nodes'

    async def _refresh(self) -> None:
        last: Exception | None = None
        for host, port in self._where.nodes:
            try:
                reply = await self._ask(
                    f"{host}:{port}", "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self._where.master
                )
            except Exception as exc:
                last = exc
                continue
            if reply is None:
                last = RedisConnectionError(f"sentinel {host}:{port} knows no master {self._where.master!r}")
                continue
            address = f"{_text(reply[0])}:{int(reply[1])}"
            if address != self._master and self._master is not None:
                log.warning("Sentinel names a new master for %s: %s", self._where.master, address)
                old = self._nodes.pop(self._master, None)
                if old is not None:
                    await old.close()
            self._master = address
            return
        raise last or RedisConnectionError("no sentinel to ask")


Commands = Channel | ClusterChannel | SentinelChannel
"""What the policy store calls: any of the three (``open_channel``)."""
