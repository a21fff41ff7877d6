"""The pipelined Redis channel of the policies' hot path, against real redis-server processes."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import hiredis
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from token_scaler.redis_channel import Channel, LuaScript
from token_scaler.redis_conn import LocalRedis, free_port


@pytest.fixture
async def channel(redis_url: str) -> AsyncIterator[Channel]:
    chan = Channel.from_url(redis_url)
    try:
        yield chan
    finally:
        await chan.close()


def key() -> str:
    return f"test:channel:{uuid.uuid4().hex}"


async def writes_of(channel: Channel, commands: list[tuple[Any, ...]]) -> tuple[list[Any], int]:
    """Replies of commands queued together, and how many socket writes carried them."""
    await channel.send("PING")  # connected
    current = channel._current
    assert current is not None and current.transport is not None
    transport = current.transport

    class Counting:
        """The transport, with its writes counted (uvloop's cannot be patched)."""

        writes = 0

        def write(self, data: bytes) -> None:
            Counting.writes += 1
            transport.write(data)

        def __getattr__(self, name: str) -> Any:
            return getattr(transport, name)

    current.transport = Counting()  # type: ignore[assignment]
    try:
        replies = await asyncio.gather(*(channel.send(*c) for c in commands))
    finally:
        current.transport = transport
    writes = Counting.writes
    return replies, writes


async def test_commands_queued_together_leave_in_one_write_and_replies_match_in_order(
    channel: Channel,
) -> None:
    k = key()
    replies, writes = await writes_of(channel, [("INCR", k)] * 500 + [("GET", k), ("DEL", k)])
    assert replies == [*range(1, 501), b"500", 1]
    assert writes == 1


async def test_an_error_reply_is_a_value_and_spoils_nothing_else(channel: Channel) -> None:
    k = key()
    first, bad, after = await asyncio.gather(
        channel.send("SET", k, "x"), channel.send("INCR", k), channel.send("GET", k)
    )
    assert (first, after) == (b"OK", b"x")
    assert isinstance(bad, ResponseError) and "not an integer" in str(bad)
    await channel.send("DEL", k)


async def test_a_script_missing_from_redis_is_loaded_and_runs_once(channel: Channel) -> None:
    k = key()
    script = LuaScript(f"-- {uuid.uuid4().hex}\nreturn redis.call('INCR', KEYS[1])")
    assert await channel.evalsha(script, [k], []) == 1  # NOSCRIPT, loaded, run
    assert await channel.evalsha(script, [k], []) == 2
    await channel.send("SCRIPT", "FLUSH")
    assert await channel.evalsha(script, [k], []) == 3  # a flushed (or restarted) Redis
    assert await channel.send("DEL", k) == 1


async def test_a_caller_that_stops_waiting_does_not_shift_the_replies(channel: Channel) -> None:
    k = key()
    await channel.send("SET", k, "v")
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await channel.send("BLPOP", key(), 0.3)  # answers after 0.3 s
    assert await channel.send("GET", k) == b"v"  # not the BLPOP's late reply
    await channel.send("DEL", k)


async def test_redis_going_away_fails_the_waiting_and_the_next_command_reconnects(
    own_redis: LocalRedis,
) -> None:
    chan = Channel.from_url(own_redis.url)
    try:
        assert await chan.send("PING") == b"PONG"
        waiting = chan.send("BLPOP", key(), 5)
        await asyncio.sleep(0.05)
        own_redis.process.kill()
        own_redis.process.wait()
        with pytest.raises(RedisConnectionError, match="lost"):
            await waiting
        with pytest.raises(RedisConnectionError, match="cannot connect"):
            await chan.send("PING")
        restarted = LocalRedis.start(port=own_redis.port)
        try:
            assert await chan.send("PING") == b"PONG"
        finally:
            restarted.stop()
    finally:
        await chan.close()


async def test_password_database_and_unix_socket_from_the_url() -> None:
    server = LocalRedis.start(password="s3cret")
    try:
        k = key()
        tcp = Channel.from_url(f"redis://:s3cret@127.0.0.1:{server.port}/3")
        unix = Channel.from_url(f"unix://:s3cret@{server.socket}?db=3")
        wrong = Channel.from_url(f"redis://:nope@127.0.0.1:{server.port}/0")
        try:
            assert await tcp.send("SET", k, "db3") == b"OK"
            assert await unix.send("GET", k) == b"db3"  # same database, over the socket
            assert await unix.send("SELECT", 0) == b"OK"
            assert await unix.send("GET", k) is None
            with pytest.raises(RedisConnectionError, match="refused AUTH"):
                await wrong.send("PING")
        finally:
            for chan in (tcp, unix, wrong):
                await chan.close()
    finally:
        server.stop()


class FakeRedis:
    """Answers +OK (PONG to PING) on every connection but the ones told to stay silent."""

    def __init__(self, silent: set[int]) -> None:
        self.silent = silent
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        number = len(self.writers)
        parser = hiredis.Reader()
        while data := await reader.read(65536):
            parser.feed(data)
            while (command := parser.gets()) is not False:
                if number not in self.silent:
                    writer.write(b"+PONG\r\n" if command[0].upper() == b"PING" else b"+OK\r\n")

    async def stop(self) -> None:
        assert self.server is not None
        for writer in self.writers:
            writer.close()
        self.server.close()


async def test_an_abandoned_handshake_leaves_nothing_to_the_next_connection() -> None:
    fake = FakeRedis(silent={1})  # the first connection never answers its AUTH
    port = await fake.start()
    chan = Channel(port=port, password="pw", connect_timeout_s=0.2)
    try:
        with pytest.raises(RedisConnectionError, match="cannot connect"):
            await chan.send("PING")
        chan._connect_timeout_s = 10.0  # the second connection: time enough on a loaded machine
        assert await chan.send("PING") == b"PONG"  # a second connection, its own AUTH
        # The first connection answers late, then closes: the second is not disturbed.
        fake.writers[0].write(b"+OK\r\n+OK\r\n")
        fake.writers[0].close()
        await asyncio.sleep(0.05)
        assert await chan.send("PING") == b"PONG"
        assert len(fake.writers) == 2
    finally:
        await chan.close()
        await fake.stop()


async def test_reset_drops_a_silent_connection_and_the_next_command_reconnects() -> None:
    fake = FakeRedis(silent={1})
    port = await fake.start()
    chan = Channel(port=port)
    try:
        waiting = chan.send("PING")
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await asyncio.shield(waiting)
        chan.reset()  # what the policy engine does when a reply takes too long
        with pytest.raises(RedisConnectionError, match="reset"):
            await waiting
        assert await chan.send("PING") == b"PONG"
        assert len(fake.writers) == 2
    finally:
        await chan.close()
        await fake.stop()


def test_the_same_under_uvloop_the_sidecars_event_loop(redis_url: str) -> None:
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        chan = Channel.from_url(redis_url)
        try:
            k = key()
            replies, writes = await writes_of(chan, [("INCR", k)] * 100 + [("DEL", k)])
            assert replies == [*range(1, 101), 1] and writes == 1
            chan.reset()
            assert await chan.send("PING") == b"PONG"
        finally:
            await chan.close()

    uvloop.run(scenario())


async def test_a_tls_url_with_its_options_reaches_a_tls_redis(certs: Path) -> None:
    """``rediss://`` and its ``ssl_*`` query options, read by redis-py's ``parse_url``."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        "redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
        "--tls-cert-file", str(certs / "server.crt"), "--tls-key-file", str(certs / "server.key"),
        "--tls-ca-cert-file", str(certs / "ca.crt"), "--tls-auth-clients", "no",
        "--save", "", "--appendonly", "no",
        stdout=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    trusted = Channel.from_url(f"rediss://127.0.0.1:{port}/2?ssl_ca_certs={certs / 'ca.crt'}")
    untrusted = Channel.from_url(f"rediss://127.0.0.1:{port}/0")  # verifies against the system's CAs
    unchecked = Channel.from_url(f"rediss://127.0.0.1:{port}/0?ssl_cert_reqs=none")
    try:
        for _ in range(200):
            try:
                assert await trusted.send("PING") == b"PONG"
                break
            except RedisConnectionError:
                assert proc.returncode is None, "redis-server with TLS did not start"
                await asyncio.sleep(0.05)
        assert b"db=2" in await trusted.send("CLIENT", "INFO")
        assert await unchecked.send("PING") == b"PONG"
        with pytest.raises(RedisConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
            await untrusted.send("PING")
    finally:
        for chan in (trusted, untrusted, unchecked):
            await chan.close()
        proc.terminate()
        await proc.wait()
