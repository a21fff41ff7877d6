"""The policies' Lua scripts (``lua/*.lua``, package data), their keys, arguments and replies by name.

Each script runs behind a header built here and ``lua/prelude.lua``:

- ``K``: the script's keys by name (``K.res``, ``K.lease``, ...), from the names it is
  loaded with, in the order its caller passes ``KEYS``;
- ``A``: its arguments by name, sent as name/value pairs in ``ARGV`` (``named``); reading a
  name that was not sent raises an error naming it;
- ``Admit`` and ``Applied``: the reply codes, from the enums below (one source for both
  languages).

Replies that carry several values are name/value pairs too (``fields`` reads them).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from importlib import resources
from typing import Any

from token_scaler.redis_channel import Arg, LuaScript


class Admit(enum.IntEnum):
    """``admit.lua``'s ``status``: what decided."""

    OK = 0
    BUDGET = 1  # the budget left is less than the reservation (or than ``least``)
    RATE_TENANT = 2  # the tenant's rate limit
    RATE_MODEL = 3  # the tenant's limit on the model


class Applied(enum.IntEnum):
    """``settle.lua``'s and ``checkpoint.lua``'s ``applied``: what the call found."""

    NONE = 0  # nothing to apply: settled already, an older checkpoint, or no trace of it
    RESERVED = 1  # against its reservation
    UNRESERVED = 2  # charged without one (admitted while Redis was away)
    RELEASED = 3  # its reservation was released when its lease ended: charged in full


def _header(keys: Sequence[str]) -> str:
    named = ", ".join(f"{name} = KEYS[{i}]" for i, name in enumerate(keys, start=1))
    codes = "".join(
        f"local {enum_.__name__} = {{{', '.join(f'{c.name} = {c.value}' for c in enum_)}}}\n"
        for enum_ in (Admit, Applied)
    )
    return (
        f"local K = {{{named}}}\n"
        "local A = {}\n"
        "for i = 1, #ARGV - 1, 2 do A[ARGV[i]] = ARGV[i + 1] end\n"
        "setmetatable(A, {__index = function(_, name) error('no argument ' .. name .. ' sent') end})\n"
        f"{codes}"
    )


def _text(name: str) -> str:
    return resources.files(__package__).joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")


def load(name: str, keys: Sequence[str]) -> LuaScript:
    """``lua/<name>.lua`` behind the header (its ``keys`` by name) and the prelude."""
    return LuaScript(_header(keys) + _text("prelude") + _text(name))


def named(**args: Arg | bool) -> list[Arg]:
    """``ARGV`` as name/value pairs (a bool as 1 or 0, a float in full)."""
    argv: list[Arg] = []
    for name, value in args.items():
        if isinstance(value, bool):
            value = int(value)
        elif isinstance(value, float):
            value = repr(value)
        argv += (name, value)
    return argv


def fields(reply: Any) -> dict[str, int]:
    """A reply of name/value pairs as a dict (the values integers, as Redis sends Lua numbers)."""
    if isinstance(reply, Exception):
        raise reply
    names, values = reply[::2], reply[1::2]
    return {(n.decode() if isinstance(n, bytes) else n): int(v) for n, v in zip(names, values, strict=True)}
