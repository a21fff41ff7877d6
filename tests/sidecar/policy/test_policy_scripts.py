"""The policies' Lua scripts as package data: keys, arguments and replies by name."""

from __future__ import annotations

import fnmatch
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.exceptions import ResponseError

from sidecar.policy import scripts
from sidecar.policy.scripts import Admit, Applied
from sidecar.policy.store import ModelAdmitted, ModelRateArgs, MoveArgs, Settled
from token_scaler.redis_channel import Channel, LuaScript

ROOT = Path(__file__).resolve().parents[3]
LUA = ROOT / "sidecar" / "policy" / "lua"


@pytest.fixture
async def channel(redis_url: str) -> AsyncIterator[Channel]:
    channel = Channel.from_url(redis_url)
    yield channel
    await channel.close()


def test_every_script_ships_in_the_wheel() -> None:
    """pyproject.toml's package-data carries every ``.lua`` file (the image installs the wheel)."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    files = sorted(p.relative_to(ROOT / "sidecar").as_posix() for p in LUA.glob("*.lua"))
    assert len(files) >= 8
    left_out = [f for f in files if not any(fnmatch.fnmatch(f, g) for g in data.get("sidecar", []))]
    assert not left_out, f"package-data leaves out {left_out}"


def test_the_header_names_keys_arguments_and_codes_from_python() -> None:
    source = scripts.load("move", keys=("rate",), args=MoveArgs._fields).source
    assert "local K = {rate = KEYS[1]}" in source
    assert "setmetatable({ms = ARGV[1]}" in source
    assert "local Admit = {OK = 0, BUDGET = 1, RATE_TENANT = 2, RATE_MODEL = 3}" in source
    assert f"RELEASED = {Applied.RELEASED.value}" in source


def test_arguments_go_in_their_declarations_order() -> None:
    assert scripts.argv(ModelRateArgs(tokens=3, interval_ms="0.5", tau_ms="10.0")) == [3, "0.5", "10.0"]


def test_a_reply_of_another_shape_is_an_error() -> None:
    assert Settled.of([1, 7, 9]) == Settled(Applied.RESERVED, 7, 9)
    with pytest.raises(ValueError, match="where 3 values were due"):
        Settled.of([1, 7])


async def test_an_argument_not_declared_is_an_error_naming_it(channel: Channel) -> None:
    script = scripts.load("move", keys=("rate",), args=("msx",))  # the script reads A.ms
    key = "tokenscaler:v1:{policy:scripts-test}:rate"
    reply = await channel.evalsha(script, [key], ["1.0"])  # an error reply: a value
    assert isinstance(reply, ResponseError) and "no argument ms" in str(reply)


async def test_a_reply_must_name_every_field(channel: Channel) -> None:
    script = LuaScript(scripts.header((), (), ("applied", "day_used")) + "return reply{applied = 1}")
    reply = await channel.evalsha(script, [], [])
    assert isinstance(reply, ResponseError) and "no day_used in the reply" in str(reply)


async def test_a_reply_by_name_becomes_its_result(channel: Channel) -> None:
    script = scripts.load("model_rate", keys=("rate",), args=ModelRateArgs._fields, reply=ModelAdmitted)
    key = "tokenscaler:v1:{policy:scripts-test/model/m}:rate"
    try:
        args = scripts.argv(ModelRateArgs(10, interval_ms="1.0", tau_ms="5.0"))
        first = ModelAdmitted.of(await channel.evalsha(script, [key], args))
        second = ModelAdmitted.of(await channel.evalsha(script, [key], args))
        assert not first.refused and 0 < first.reset_ms <= 11
        assert second.refused and second.retry_after_ms > 0
    finally:
        await channel.send("DEL", key)


def test_reply_codes_are_enums() -> None:
    assert Admit(2) is Admit.RATE_TENANT and Applied(0) is Applied.NONE
