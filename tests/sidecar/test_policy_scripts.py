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
from sidecar.policy.store import ModelAdmitted
from token_scaler.redis_channel import Channel

ROOT = Path(__file__).resolve().parents[2]
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


def test_the_header_names_keys_and_codes_from_python() -> None:
    source = scripts.load("move", ("rate",)).source
    assert "local K = {rate = KEYS[1]}" in source
    assert "local Admit = {OK = 0, BUDGET = 1, RATE_TENANT = 2, RATE_MODEL = 3}" in source
    assert f"RELEASED = {Applied.RELEASED.value}" in source


def test_arguments_go_as_name_value_pairs() -> None:
    assert scripts.named(id="a", cost=3, daily=True, interval=0.5) == [
        "id", "a", "cost", 3, "daily", 1, "interval", "0.5",
    ]  # fmt: skip


async def test_a_missing_argument_is_an_error_naming_it(channel: Channel) -> None:
    script = scripts.load("move", ("rate",))
    key = "tokenscaler:v1:{policy:scripts-test}:rate"
    reply = await channel.evalsha(script, [key], scripts.named(msx=1.0))  # an error reply: a value
    assert isinstance(reply, ResponseError) and "no argument ms sent" in str(reply)


async def test_a_reply_by_name_becomes_its_result(channel: Channel) -> None:
    script = scripts.load("model_rate", ("rate",))
    key = "tokenscaler:v1:{policy:scripts-test/model/m}:rate"
    try:
        args = scripts.named(tokens=10, interval_ms=1.0, tau_ms=5.0)
        first = ModelAdmitted.of(await channel.evalsha(script, [key], args))
        second = ModelAdmitted.of(await channel.evalsha(script, [key], args))
        assert not first.refused and 0 < first.reset_ms <= 11
        assert second.refused and second.retry_after_ms > 0
    finally:
        await channel.send("DEL", key)


def test_reply_codes_are_enums() -> None:
    assert Admit(2) is Admit.RATE_TENANT and Applied(0) is Applied.NONE
