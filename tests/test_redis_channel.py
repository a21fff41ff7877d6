"""The pipelined Redis channel of the policies' hot path, against real redis-server processes."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from token_scaler.redis_channel import Channel, LuaScript
from token_scaler.redis_conn import LocalRedis


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
    transport = channel._transport
    assert transport is not None
    writes = 0
    write = transport.write

    def counted(data: Any) -> None:
        nonlocal writes
        writes += 1
        write(data)

    transport.write = counted  # type: ignore[method-assign]
    try:
        replies = await asyncio.gather(*(channel.send(*c) for c in commands))
    finally:
        transport.write = write  # type: ignore[method-assign]
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
