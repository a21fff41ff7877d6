"""The project's Redis client packs commands with hiredis: the same bytes reach Redis."""

from __future__ import annotations

import pytest
import redis.asyncio as aioredis

from scaler.config import ScalerConfig
from token_scaler.errors import ConfigError
from token_scaler.redis_conn import PackedConnection, RedisUrlError, connect, connection_class, locate


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


def test_cluster_and_sentinel_urls_are_read_in_one_place() -> None:
    cluster = locate("redis+cluster://user:s3cret@10.0.0.1:7000,10.0.0.2/")
    assert cluster.kind == "cluster"
    assert cluster.nodes == (("10.0.0.1", 7000), ("10.0.0.2", 6379))
    assert cluster.credentials() == {"username": "user", "password": "s3cret"}
    sentinel = locate("rediss+sentinel://:pw@s1,s2:26380/mymaster")
    assert sentinel.kind == "sentinel" and sentinel.master == "mymaster"
    assert sentinel.nodes == (("s1", 26379), ("s2", 26380))
    assert sentinel.credentials() == {"password": "pw", "ssl": True}
    assert locate("redis://h:6379/0").kind == "single"


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://h:1/", "expected a redis://, rediss://, unix://, redis+cluster:// or redis+sentinel:// URL"),
        ("redis+cluster://h:1/2", "a Redis Cluster has only database 0, the URL asks for '2'"),
        ("redis+cluster://h:99999/", "'h:99999' has no valid port (1-65535)"),
        ("redis+cluster://h:1,,h:2/", "expected host:port for every node, got ''"),
        ("redis+sentinel://h:26379/", "expected the master's name as the path"),
        ("redis+cluster://h:1/?ssl_cert_reqs=none", "options after '?' are not read in a cluster URL"),
    ],
)
def test_bad_redis_urls_are_named(url: str, reason: str) -> None:
    with pytest.raises(RedisUrlError) as caught:
        locate(url)
    assert str(caught.value).startswith(repr(url))
    assert reason in caught.value.reason


def test_bad_redis_url_names_the_option_and_hides_the_password() -> None:
    with pytest.raises(ConfigError, match=r"--redis-url=.*is invalid: .*only database 0"):
        ScalerConfig.from_args(["--redis-url", "redis+cluster://h:1/3"], {})
    with pytest.raises(RedisUrlError) as caught:
        locate("redis+sentinel://u:topsecret@h:1/")
    assert "topsecret" not in str(caught.value) and "***@h:1" in str(caught.value)
