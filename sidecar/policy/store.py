"""The policies' shared state in Redis: one Lua script to admit, one to settle (thin I/O).

The scripts are ``lua/*.lua`` (scripts.py loads them; keys, arguments and replies by name).

Keys, one set per tenant in its own Redis Cluster slot (the ``{...}`` hash tag), so both
scripts touch only keys of one slot::

    tokenscaler:v1:{policy:<scope>:<tenant>}:budget:d:<YYYYMMDD>  used today (tokens or 1e-9 money)
    tokenscaler:v1:{policy:<scope>:<tenant>}:budget:m:<YYYYMM>    used this month
    tokenscaler:v1:{policy:<scope>:<tenant>}:rate                 GCRA TAT (ms, Redis clock)
    tokenscaler:v1:{policy:<scope>:<tenant>}:rate:m:<model>       GCRA TAT of a per-model limit
    tokenscaler:v1:{policy:<scope>:<tenant>}:res                  open reservations:
                                                                  id -> "cost:tokens:day:month"
    tokenscaler:v1:{policy:<scope>:<tenant>}:lease                their leases: id by deadline (ms)
    tokenscaler:v1:{policy:<scope>:<tenant>}:swept:<id>           released when its lease ended (3 days)
    tokenscaler:v1:{policy:<scope>:<tenant>}:charged:<id>         charged without a reservation (a day)
    tokenscaler:v1:{policy:<scope>}:sidecars                      sidecars of the scope, by last seen
    tokenscaler:v1:{policy:<scope>/model/<model>}:rate            GCRA TAT of a model, all tenants
    tokenscaler:v1:{policy:<scope>/spend}:h:<YYYYMMDDHH>          the scope's spend this UTC hour (1e-9 money)
    tokenscaler:v1:{policy:<scope>/spend}:sent:<id>               a spend batch added (2 hours)

A model's limit across tenants lives in a slot of its own ('/' is not allowed in tenant
names, so it cannot collide with a tenant's tag). ``model_rate.lua`` checks and takes it, queued
in the same write as ``admit.lua``; when one of the two refuses and the other admitted, the
sidecar gives back what the other took (a release, or ``move.lua`` by minus the tokens).
Settlements move it by the difference between real and reserved tokens, once (``move.lua`` has
no id: it is sent at most once, a lost correction only tightens the limit for a burst).

``admit.lua`` (one round trip per request) reads the budgets, grants the reservation (all of it,
or under ``onShortfall: shorten`` what is left if that is at least the minimum), checks
both rate limits for the granted tokens, and only if everything passes commits all of it
and records the reservation. Scripts run atomically, so concurrent requests from any
number of sidecars see each other's reservations: used + reserved never passes a limit.

``settle.lua`` moves a reservation to the real usage: it removes the reservation and adds
``real - reserved`` (negative: a refund) to the budgets and the rate limits' TATs. It is
idempotent (a reservation is settled once; a retried call finds it gone and does nothing),
so a settle whose reply was lost can be sent again without a double refund. For requests
admitted while Redis was away (fail-open) it charges the real usage instead, once: the id is
kept a day in ``:charged:<id>``, whichever branch charged it.

Leases: a sidecar killed mid-request never settles, and its reservation would hold the
tenant's budget to the period's end. Every reservation therefore has a lease (``:lease``,
deadline on Redis' clock) that its sidecar renews while the request runs (``renew.lua``, a
pipeline every third of the lease). ``admit.lua`` first releases the tenant's reservations whose
lease has ended (refunds them; at most 32 per call) and keeps each in ``:swept:<id>``. A
settlement that arrives after that (a sidecar stalled longer than the lease, not dead)
finds it there and charges the real usage in full: the release never loses a charge, it
only frees the budget early.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable
from dataclasses import dataclass, fields
from typing import Any, NamedTuple

from sidecar.policy import scripts
from sidecar.policy.scripts import ADMIT, APPLIED, Admit, Applied
from token_scaler.record import KEY_PREFIX
from token_scaler.redis_channel import Arg, LuaScript
from token_scaler.redis_routing import Commands

RESERVATIONS_TTL_S = 3 * 86_400
# How long a fail-open charge is remembered by its id, so a settlement sent again (its reply
# lost) is not charged twice. One key per request admitted without Redis: a day bounds the
# memory an outage leaves behind; a settlement is resent within seconds of Redis answering.
CHARGED_TTL_S = 86_400
DAY_TTL_S = 3 * 86_400
MONTH_TTL_S = 40 * 86_400
# The scope's spend of an hour, and the marks of the batches added to it, are kept this long.
SPEND_TTL_S = 2 * 3600
# Sidecars of a scope count as present this long after they announced themselves.
PRESENCE_WINDOW_MS = 60_000


def model_rate_key(scope: str, model: str) -> str:
    return f"{KEY_PREFIX}:{{policy:{scope}/model/{model}}}:rate"


def spend_keys(scope: str, hour: str, batch: str) -> SpendKeys:
    """The scope's spend in ``hour`` (``YYYYMMDDHH``) and the mark of ``batch`` (one slot)."""
    base = f"{KEY_PREFIX}:{{policy:{scope}/spend}}"
    return SpendKeys(f"{base}:h:{hour}", f"{base}:sent:{batch}")


def presence_key(scope: str) -> str:
    return f"{KEY_PREFIX}:{{policy:{scope}}}:sidecars"


class SpendKeys(NamedTuple):
    hour: str  # the scope's spend this hour
    sent: str  # set when a batch was added: a batch sent again is not added twice


class TenantKeys(NamedTuple):
    """A tenant's keys, in the order the scripts take them (``K.res``, ``K.day``, ...)."""

    res: str  # open reservations
    day: str  # budget used today
    month: str  # budget used this month
    rate: str  # the tenant's rate limit (GCRA TAT)
    model_rate: str  # the tenant's limit on the model
    lease: str  # the reservations' leases


def tenant_keys(scope: str, tenant: str, day: str, month: str, model: str | None) -> TenantKeys:
    base = f"{KEY_PREFIX}:{{policy:{scope}:{tenant}}}"
    return TenantKeys(
        f"{base}:res",
        f"{base}:budget:d:{day}",
        f"{base}:budget:m:{month}",
        f"{base}:rate",
        f"{base}:rate:m:{model or ''}",
        f"{base}:lease",
    )


# Each script's arguments, by name (scripts.argv): a flag is 1 or 0, a float its exact repr.
# The order is the wire's: the header of the script reads them in it (scripts.py).


class AdmitArgs(NamedTuple):
    id: str  # the reservation's
    cost: int  # asked for
    day_limit: int  # the daily budget (0: none)
    month_limit: int
    least: int  # the least grant taken when less than ``cost`` is left (0: all or nothing)
    tokens: int  # for the rate limits
    tenant_interval: str  # the tenant's limit: ms per token (0: none) and burst (ms)
    tenant_tau: str
    model_interval: str  # the tenant's limit on the model
    model_tau: str
    lease_ms: int
    day: str  # the budget periods, for a release at the lease's end
    month: str
    day_ttl: int = DAY_TTL_S
    month_ttl: int = MONTH_TTL_S
    reservations_ttl: int = RESERVATIONS_TTL_S


class SettleArgs(NamedTuple):
    id: str
    cost: int  # real
    tokens: int
    daily: int  # the budgets kept
    monthly: int
    tenant_interval: str
    model_interval: str
    unreserved: int  # admitted without Redis: charged, once
    day_ttl: int = DAY_TTL_S
    month_ttl: int = MONTH_TTL_S
    charged_ttl: int = CHARGED_TTL_S


class CheckpointArgs(NamedTuple):
    id: str
    seq: int
    held_cost: int
    held_tokens: int
    charged_cost: int
    charged_tokens: int
    daily: int
    monthly: int
    tenant_interval: str
    model_interval: str
    day_ttl: int = DAY_TTL_S
    month_ttl: int = MONTH_TTL_S


class ModelRateArgs(NamedTuple):
    tokens: int
    interval_ms: str
    tau_ms: str


class SpendArgs(NamedTuple):
    amount: int  # billionths of the currency unit; 0: only read
    ttl_s: int = SPEND_TTL_S


class MoveArgs(NamedTuple):
    ms: str


class PresenceArgs(NamedTuple):
    sidecar: str
    window_ms: int


class RenewArgs(NamedTuple):
    lease_ms: int
    ids: str  # a JSON list


@dataclass(frozen=True, slots=True)
class Admitted:
    status: Admit
    granted: int
    day_used: int
    month_used: int
    retry_after_ms: int  # when refused by a rate limit
    reset_ms: int  # TAT - now of the tenant limit (of the refusing one when refused)
    model_reset_ms: int
    redis_time_ms: int  # Redis' clock when it decided
    expired: int  # reservations of this tenant released because their lease ended

    @staticmethod
    def of(reply: Any) -> Admitted:
        """``admit.lua``'s reply, by name."""
        status, *rest = scripts.values(reply, _ADMITTED)
        return Admitted(ADMIT[status], *rest)


@dataclass(frozen=True, slots=True)
class ModelAdmitted:
    refused: bool
    retry_after_ms: int
    reset_ms: int  # TAT - now

    @staticmethod
    def of(reply: Any) -> ModelAdmitted:
        """``model_rate.lua``'s reply, by name."""
        refused, retry_after_ms, reset_ms = scripts.values(reply, _MODEL_ADMITTED)
        return ModelAdmitted(bool(refused), retry_after_ms, reset_ms)


@dataclass(frozen=True, slots=True)
class Spent:
    total: int  # the scope's spend this hour, after the batch

    @staticmethod
    def of(reply: Any) -> Spent:
        """``spend.lua``'s reply, by name."""
        (total,) = scripts.values(reply, 1)
        return Spent(int(total))


@dataclass(frozen=True, slots=True)
class Settled:
    applied: Applied
    day_used: int
    month_used: int

    @staticmethod
    def of(reply: Any) -> Settled:
        """``settle.lua``'s or ``checkpoint.lua``'s reply, by name."""
        applied, day_used, month_used = scripts.values(reply, _SETTLED)
        return Settled(APPLIED[applied], day_used, month_used)


# The scripts (lua/, scripts.py) with their keys, arguments and replies by name: a tenant's
# keys (``TenantKeys``), a model's limit across tenants, or a scope's sidecars.
_TENANT = TenantKeys._fields
_ADMIT = scripts.load("admit", keys=_TENANT, args=AdmitArgs._fields, reply=Admitted)
_SETTLE = scripts.load("settle", keys=_TENANT, args=SettleArgs._fields, reply=Settled)
_CHECKPOINT = scripts.load("checkpoint", keys=_TENANT, args=CheckpointArgs._fields, reply=Settled)
_RENEW = scripts.load("renew", keys=("lease",), args=RenewArgs._fields)
_PRESENCE = scripts.load("presence", keys=("sidecars",), args=PresenceArgs._fields)
_MODEL_RATE = scripts.load("model_rate", keys=("rate",), args=ModelRateArgs._fields, reply=ModelAdmitted)
_MOVE = scripts.load("move", keys=("rate",), args=MoveArgs._fields)
_SPEND = scripts.load("spend", keys=SpendKeys._fields, args=SpendArgs._fields, reply=Spent)
_ADMITTED, _MODEL_ADMITTED, _SETTLED = (len(fields(result)) for result in (Admitted, ModelAdmitted, Settled))


def _raised(reply: Any) -> Any:
    if isinstance(reply, Exception):
        raise reply
    return reply


Item = tuple[TenantKeys, list[Arg]]  # a settlement's or a checkpoint's keys and arguments


class Store:
    """The scripts and commands of the policies, over one pipelined channel.

    Every method queues its commands when it is called (not when awaited), so commands
    issued together leave in one write: ``settle_many`` then ``admit`` costs one round trip.
    """

    def __init__(self, channel: Commands) -> None:
        self.channel = channel

    def admit(
        self,
        keys: TenantKeys,
        *,
        id: str,
        cost: int,
        day_limit: int,
        month_limit: int,
        least: int,
        tokens: int,
        tenant_rate: tuple[float, float],
        model_rate: tuple[float, float],
        lease_ms: int,
        day: str,
        month: str,
        flush: bool = True,
    ) -> Awaitable[Admitted]:
        """Reserve ``cost`` (``tokens`` for the rate limits, each an (interval, tau) in ms)."""
        args = scripts.argv(
            AdmitArgs(
                id=id,
                cost=cost,
                day_limit=day_limit,
                month_limit=month_limit,
                least=least,
                tokens=tokens,
                tenant_interval=repr(tenant_rate[0]),
                tenant_tau=repr(tenant_rate[1]),
                model_interval=repr(model_rate[0]),
                model_tau=repr(model_rate[1]),
                lease_ms=lease_ms,
                day=day,
                month=month,
            )
        )
        # ``flush``: written at once, for a request waiting on it (settlements and a model
        # check queued before it leave in the same write); a chunk asked for ahead rides in
        # the loop iteration's write instead.
        return self.channel.evalsha(_ADMIT, keys, args, convert=Admitted.of, flush=flush)

    def model_rate(
        self, key: str, tokens: int, interval_ms: float, tau_ms: float
    ) -> Awaitable[ModelAdmitted]:
        """Check and take a model's limit across tenants (queued now: call it before
        ``admit``, which writes both)."""
        args = scripts.argv(ModelRateArgs(tokens, interval_ms=repr(interval_ms), tau_ms=repr(tau_ms)))
        return self.channel.evalsha(_MODEL_RATE, [key], args, convert=ModelAdmitted.of)

    def move(self, key: str, ms: float) -> Awaitable[Any]:
        """Move a rate limit's TAT by ``ms`` (queued now; the reply says nothing useful)."""
        return self.channel.evalsha(_MOVE, [key], scripts.argv(MoveArgs(ms=repr(ms))))

    def settle_many(self, items: list[Item]) -> Awaitable[list[Settled | BaseException]]:
        """Settle several reservations (one ``settle.lua`` each, queued together).

        Each item is (keys, ``settle_args(...)``); each result is its ``Settled``, or the
        error of that one (a ``ResponseError`` from the script, a lost connection).
        """
        return self._many(_SETTLE, items)

    def _many(self, script: LuaScript, items: list[Item]) -> Awaitable[list[Settled | BaseException]]:
        """One ``script`` per item, queued now; their replies as ``Settled`` or errors."""
        return self._settled([self.channel.evalsha(script, keys, args) for keys, args in items])

    @staticmethod
    async def _settled(replies: list[asyncio.Future[Any]]) -> list[Settled | BaseException]:
        done = await asyncio.gather(*replies, return_exceptions=True)  # futures: no task each
        return [r if isinstance(r, BaseException) else Settled.of(r) for r in done]

    def checkpoint_many(self, items: list[Item]) -> Awaitable[list[Settled | BaseException]]:
        """Move chunks to their state (one ``checkpoint.lua`` each, queued together): each item
        is (keys, ``checkpoint_args(...)``), each result a ``Settled`` or the error of that one."""
        return self._many(_CHECKPOINT, items)

    def spend(self, keys: SpendKeys, amount: int) -> Awaitable[Spent]:
        """Add a batch of spend to the scope's hour, once (0: only read); its total after."""
        return self.channel.evalsha(_SPEND, keys, scripts.argv(SpendArgs(amount)), convert=Spent.of)

    async def announce(self, scope: str, sidecar: str) -> int:
        """Say this sidecar is alive; how many sidecars of the scope are (itself included)."""
        args = scripts.argv(PresenceArgs(sidecar=sidecar, window_ms=PRESENCE_WINDOW_MS))
        return int(_raised(await self.channel.evalsha(_PRESENCE, [presence_key(scope)], args)))

    async def leave(self, scope: str, sidecar: str) -> None:
        _raised(await self.channel.send("ZREM", presence_key(scope), sidecar))

    async def renew(self, leases: dict[str, list[str]], lease_ms: int) -> set[str]:
        """Push the leases of open reservations ``lease_ms`` past now: {lease key: [ids]};
        the ids whose lease was there to push."""
        replies = [
            self.channel.evalsha(
                _RENEW, [key], scripts.argv(RenewArgs(lease_ms=lease_ms, ids=json.dumps(ids)))
            )
            for key, ids in leases.items()
        ]
        renewed: set[str] = set()
        for ids, reply in zip(
            leases.values(), await asyncio.gather(*replies, return_exceptions=True), strict=True
        ):
            renewed.update(id for id, done in zip(ids, _raised(reply), strict=True) if int(done))
        return renewed

    async def ping(self) -> None:
        _raised(await self.channel.send("PING"))

    async def time(self) -> float:
        """Redis' clock, seconds."""
        seconds, micros = _raised(await self.channel.send("TIME"))
        return int(seconds) + int(micros) / 1e6

    async def get(self, key: str) -> bytes | None:
        reply: bytes | None = _raised(await self.channel.send("GET", key))
        return reply


def settle_args(
    *,
    id: str,
    cost: int,
    tokens: int,
    daily: bool,
    monthly: bool,
    tenant_interval: float,
    model_interval: float,
    unreserved: bool,
) -> list[Arg]:
    return scripts.argv(
        SettleArgs(
            id=id,
            cost=cost,
            tokens=tokens,
            daily=int(daily),
            monthly=int(monthly),
            tenant_interval=repr(tenant_interval),
            model_interval=repr(model_interval),
            unreserved=int(unreserved),
        )
    )


def checkpoint_args(
    *,
    id: str,
    seq: int,
    held: tuple[int, int],
    charged: tuple[int, int],
    daily: bool,
    monthly: bool,
    tenant_interval: float,
    model_interval: float,
) -> list[Arg]:
    """A chunk's state: held (cost, tokens) and charged (cost, tokens) under ``seq``."""
    return scripts.argv(
        CheckpointArgs(
            id=id,
            seq=seq,
            held_cost=held[0],
            held_tokens=held[1],
            charged_cost=charged[0],
            charged_tokens=charged[1],
            daily=int(daily),
            monthly=int(monthly),
            tenant_interval=repr(tenant_interval),
            model_interval=repr(model_interval),
        )
    )
