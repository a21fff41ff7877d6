"""The policies' Lua scripts (``lua/*.lua``, package data), their keys, arguments and replies by name.

Each script's keys, arguments and reply are declared once, in Python (store.py: a NamedTuple
of its keys, one of its arguments, a dataclass of its reply), and the script runs behind a
header generated from those declarations, then ``lua/prelude.lua``:

- ``K``: its keys by name (``K.res``, ``K.lease``, ...);
- ``A``: its arguments by name (``A.cost``, ``A.lease_ms``, ...); reading a name the
  declaration lacks raises an error naming it;
- ``reply{name = value, ...}``: its reply by name; a name of the declaration left out is an
  error naming it;
- ``Admit`` and ``Applied``: the reply codes, from the enums below.

On the wire ``KEYS``, ``ARGV`` and the reply are in the declarations' order, so a request
costs what it did with positional arguments, and neither side can read another's slot.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterator, Sequence
from importlib import resources
from typing import Any, Protocol

from token_scaler.redis_channel import Arg, LuaScript


class Admit(enum.IntEnum):
    """``admit.lua``'s ``status``: what decided."""

    OK = 0
    BUDGET = 1  # the budget left is less than the reservation (or than ``least``)
    RATE_TENANT = 2  # the tenant's rate limit
    RATE_MODEL = 3  # the tenant's limit on the model


ADMIT = {code.value: code for code in Admit}  # a reply's code to its member, quicker than Admit(code)


class Applied(enum.IntEnum):
    """``settle.lua``'s and ``checkpoint.lua``'s ``applied``: what the call found."""

    NONE = 0  # nothing to apply: settled already, an older checkpoint, or no trace of it
    RESERVED = 1  # against its reservation
    UNRESERVED = 2  # charged without one (admitted while Redis was away)
    RELEASED = 3  # its reservation was released when its lease ended: charged in full


APPLIED = {code.value: code for code in Applied}


class Named(Protocol):
    """A script's arguments: a NamedTuple (a flag as 1 or 0, a float as its exact ``repr``)."""

    @property
    def _fields(self) -> tuple[str, ...]: ...

    def __iter__(self) -> Iterator[Arg]: ...

    def __len__(self) -> int: ...


def _table(names: Sequence[str], source: str) -> str:
    """A Lua table of ``names`` read from ``source`` (``KEYS``, ``ARGV``) in their order."""
    return "{" + ", ".join(f"{name} = {source}[{i}]" for i, name in enumerate(names, start=1)) + "}"


def header(keys: Sequence[str], args: Sequence[str], reply: Sequence[str]) -> str:
    codes = "".join(
        f"local {enum_.__name__} = {{{', '.join(f'{c.name} = {c.value}' for c in enum_)}}}\n"
        for enum_ in (Admit, Applied)
    )
    fields = ", ".join(f"'{name}'" for name in reply)
    return (
        f"local K = {_table(keys, 'KEYS')}\n"
        f"local A = setmetatable({_table(args, 'ARGV')}, "
        "{__index = function(_, name) error('no argument ' .. name) end})\n"
        f"local REPLY = {{{fields}}}\n"
        "local function reply(named)\n"
        "  local out = {}\n"
        "  for i, name in ipairs(REPLY) do\n"
        "    out[i] = named[name]\n"
        "    if out[i] == nil then error('no ' .. name .. ' in the reply') end\n"
        "  end\n"
        "  return out\n"
        "end\n"
        f"{codes}"
    )


def _text(name: str) -> str:
    return resources.files(__package__).joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")


def load(name: str, *, keys: Sequence[str], args: Sequence[str], reply: type | None = None) -> LuaScript:
    """``lua/<name>.lua`` behind the header (its ``keys``, ``args`` and ``reply``, a
    dataclass, by name) and the prelude."""
    names = [f.name for f in dataclasses.fields(reply)] if reply is not None else []
    return LuaScript(header(keys, args, names) + _text("prelude") + _text(name))


def argv(args: Named) -> list[Arg]:
    """``ARGV``: the arguments in their declaration's order (the header names them)."""
    return list(args)


def values(reply: Any, count: int) -> list[Any]:
    """A reply's values, in its declaration's order (``reply{...}`` wrote them by name)."""
    if isinstance(reply, Exception):
        raise reply
    if len(reply) != count:
        raise ValueError(f"a script replied {reply!r} where {count} values were due")
    return list(reply)
