"""The project's Redis client packs commands with hiredis: the same bytes reach Redis."""

from __future__ import annotations

import redis.asyncio as aioredis

from token_scaler.redis_conn import PackedConnection, connect, connection_class


async def test_packed_commands_round_trip(redis_url: str, workload: str) -> None:
    client = connect(redis_url)
    try:
        assert client.connection_pool.connection_class is PackedConnection
        sha = await client.script_load("return {ARGV[1], ARGV[2], ARGV[3], KEYS[1]}")  # "SCRIPT LOAD"
        key = f"tokenscaler:v1:{{{workload}}}:probe"
        reply = await client.evalsha(sha, 1, key, 1.5, b"\x00bytes", 10**15)
        assert reply == [b"1.5", b"\x00bytes", b"1000000000000000", key.encode()]
        pipe = client.pipeline(transaction=False)
        pipe.set(key, "v", px=30_000)
        pipe.get(key)
        pipe.config_get("maxmemory")  # "CONFIG GET": a two-word command name
        assert (await pipe.execute())[:2] == [True, b"v"]
        await client.delete(key)
    finally:
        await client.aclose()


def test_tls_and_unix_urls_keep_redis_pys_own_connections() -> None:
    assert connection_class("redis://h:6379/0") == {"connection_class": PackedConnection}
    assert connection_class("rediss://h:6380/0") == {}
    assert connection_class("unix:///run/redis.sock") == {}
    tls = connect("rediss://h:6380/0")
    assert tls.connection_pool.connection_class is aioredis.SSLConnection
