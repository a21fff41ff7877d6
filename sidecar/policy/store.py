"""The policies' shared state in Redis: one Lua script to admit, one to settle (thin I/O).

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

A model's limit across tenants lives in a slot of its own ('/' is not allowed in tenant
names, so it cannot collide with a tenant's tag). ``MODEL_RATE`` checks and takes it, queued
in the same write as ``ADMIT``; when one of the two refuses and the other admitted, the
sidecar gives back what the other took (a release, or ``MOVE`` by minus the tokens).
Settlements move it by the difference between real and reserved tokens, once (``MOVE`` has
no id: it is sent at most once, a lost correction only tightens the limit for a burst).

``ADMIT`` (one round trip per request) reads the budgets, grants the reservation (all of it,
or under ``onShortfall: shorten`` what is left if that is at least the minimum), checks
both rate limits for the granted tokens, and only if everything passes commits all of it
and records the reservation. Scripts run atomically, so concurrent requests from any
number of sidecars see each other's reservations: used + reserved never passes a limit.

``SETTLE`` moves a reservation to the real usage: it removes the reservation and adds
``real - reserved`` (negative: a refund) to the budgets and the rate limits' TATs. It is
idempotent (a reservation is settled once; a retried call finds it gone and does nothing),
so a settle whose reply was lost can be sent again without a double refund. For requests
admitted while Redis was away (fail-open) it charges the real usage instead, once: the id is
kept a day in ``:charged:<id>``, whichever branch charged it.

Leases: a sidecar killed mid-request never settles, and its reservation would hold the
tenant's budget to the period's end. Every reservation therefore has a lease (``:lease``,
deadline on Redis' clock) that its sidecar renews while the request runs (``RENEW``, a
pipeline every third of the lease). ``ADMIT`` first releases the tenant's reservations whose
lease has ended (refunds them; at most 32 per call) and keeps each in ``:swept:<id>``. A
settlement that arrives after that (a sidecar stalled longer than the lease, not dead)
finds it there and charges the real usage in full: the release never loses a charge, it
only frees the budget early.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

from token_scaler.record import KEY_PREFIX
from token_scaler.redis_channel import Arg, Channel, LuaScript

RESERVATIONS_TTL_S = 3 * 86_400
# How long a fail-open charge is remembered by its id, so a settlement sent again (its reply
# lost) is not charged twice. One key per request admitted without Redis: a day bounds the
# memory an outage leaves behind; a settlement is resent within seconds of Redis answering.
CHARGED_TTL_S = 86_400
DAY_TTL_S = 3 * 86_400
MONTH_TTL_S = 40 * 86_400

# Lua every script below starts with: Redis' clock in ms (``now``), and the GCRA on one TAT
# key: ``gcra`` checks a take and writes nothing, ``set_tat`` writes, ``move`` shifts a TAT
# by ``ms`` (negative: gives tokens back; a TAT that falls into the past is gone); ``charge``
# applies a settlement's difference to a tenant's budgets and rate limits.
_PRELUDE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local function set_tat(key, tat)
  redis.call('SET', key, string.format('%.3f', tat), 'PX', math.ceil(tat - now) + 1)
end
local function gcra(key, tokens, interval, tau)
  -- the TAT after taking ``tokens``; or nil, the wait and what is owed (ms) when refused
  local tat = tonumber(redis.call('GET', key) or '0')
  if tat < now then tat = now end
  local new = tat + tokens * interval
  local need = tau
  if tokens * interval > need then need = tokens * interval end
  if new - need > now then return nil, math.ceil(new - need - now), math.ceil(tat - now) end
  return new
end
local function move(key, ms)
  local tat = tonumber(redis.call('GET', key) or '0')
  if tat == 0 then return 0 end
  tat = tat + ms
  if tat > now then set_tat(key, tat) else redis.call('DEL', key) end
  return 1
end
-- A tenant's keys (tenant_keys): add ``cost`` to the budgets kept (daily, monthly) and move
-- both rate limits' TATs by ``tokens``; returns the budgets used after it.
local function charge(cost, tokens, daily, monthly, tenant_interval, model_interval, day_ttl, month_ttl)
  local used = {0, 0}
  for i, kept in ipairs({daily, monthly}) do
    if kept then
      local key = KEYS[1 + i]
      if cost ~= 0 then
        used[i] = redis.call('INCRBY', key, string.format('%d', cost))
        redis.call('EXPIRE', key, i == 1 and day_ttl or month_ttl)
      else used[i] = tonumber(redis.call('GET', key) or '0') end
    end
  end
  if tokens ~= 0 then
    for i, interval in ipairs({tonumber(tenant_interval), tonumber(model_interval)}) do
      if interval > 0 then move(KEYS[3 + i], tokens * interval) end
    end
  end
  return used[1], used[2]
end
"""

ADMIT = """
local expired = redis.call('ZRANGEBYSCORE', KEYS[6], '-inf', now, 'LIMIT', 0, 32)
if #expired > 0 then
  local base = string.sub(KEYS[1], 1, -5)
  for _, id in ipairs(expired) do
    local held = redis.call('HGET', KEYS[1], id)
    if held then
      local c, _, d, m = string.match(held, '^(%d+):(%d+):(%d*):(%d*)')
      if c and c ~= '0' then
        for _, k in ipairs({d ~= '' and base .. ':budget:d:' .. d, m ~= '' and base .. ':budget:m:' .. m}) do
          if k and redis.call('EXISTS', k) == 1 then redis.call('DECRBY', k, c) end
        end
      end
      redis.call('HDEL', KEYS[1], id)
      redis.call('SET', base .. ':swept:' .. id, held, 'EX', ARGV[13])
    end
  end
  redis.call('ZREM', KEYS[6], unpack(expired))
end
local cost, dl, ml = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local du, mu = 0, 0
if dl > 0 then du = tonumber(redis.call('GET', KEYS[2]) or '0') end
if ml > 0 then mu = tonumber(redis.call('GET', KEYS[3]) or '0') end
local granted = cost
if dl > 0 and dl - du < granted then granted = dl - du end
if ml > 0 and ml - mu < granted then granted = ml - mu end
if granted < cost then
  local least = tonumber(ARGV[5])
  if least <= 0 or granted < least then return {1, 0, du, mu, 0, 0, 0, now, #expired} end
end
local tokens = tonumber(ARGV[6])
if granted < cost and cost > 0 then tokens = math.ceil(tokens * granted / cost) end
local tats = {0, 0}
for i = 1, 2 do
  local interval, tau = tonumber(ARGV[5 + 2 * i]), tonumber(ARGV[6 + 2 * i])
  if interval > 0 then
    local new, wait, owed = gcra(KEYS[3 + i], tokens, interval, tau)
    if not new then return {1 + i, 0, du, mu, wait, owed, 0, now, #expired} end
    tats[i] = new
  end
end
for i = 1, 2 do
  if tats[i] > 0 then set_tat(KEYS[3 + i], tats[i]) end
end
local g = string.format('%d', granted)
if dl > 0 then du = redis.call('INCRBY', KEYS[2], g); redis.call('EXPIRE', KEYS[2], ARGV[11]) end
if ml > 0 then mu = redis.call('INCRBY', KEYS[3], g); redis.call('EXPIRE', KEYS[3], ARGV[12]) end
local day, month = '', ''
if dl > 0 then day = ARGV[15] end
if ml > 0 then month = ARGV[16] end
redis.call('HSET', KEYS[1], ARGV[1], g .. ':' .. string.format('%d', tokens) .. ':' .. day .. ':' .. month)
redis.call('EXPIRE', KEYS[1], ARGV[13])
redis.call('ZADD', KEYS[6], string.format('%.0f', now + tonumber(ARGV[14])), ARGV[1])
redis.call('EXPIRE', KEYS[6], ARGV[13])
local r1, r2 = 0, 0
if tats[1] > 0 then r1 = math.ceil(tats[1] - now) end
if tats[2] > 0 then r2 = math.ceil(tats[2] - now) end
return {0, granted, du, mu, 0, r1, r2, now, #expired}
"""

SETTLE = """
local base = string.sub(KEYS[1], 1, -5)
local cost, tokens = tonumber(ARGV[2]), tonumber(ARGV[3])
local dl, ml = ARGV[4] == '1', ARGV[5] == '1'
-- Admitted without Redis (fail-open): whichever branch charges it, it is charged once.
local unreserved = ARGV[8] == '1'
local charged = base .. ':charged:' .. ARGV[1]
local done = unreserved and redis.call('EXISTS', charged) == 1
local held = not done and redis.call('HGET', KEYS[1], ARGV[1])
local swept = not done and not held and redis.call('GET', base .. ':swept:' .. ARGV[1])
local applied = 0
if done then
  cost, tokens = 0, 0
elseif held then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('ZREM', KEYS[6], ARGV[1])
  local c, tk = string.match(held, '^(%d+):(%d+)')
  cost = cost - tonumber(c)
  tokens = tokens - tonumber(tk)
  applied = 1
elseif swept then
  -- released when its lease ended (budget refunded, rate limits not): charge in full
  redis.call('DEL', base .. ':swept:' .. ARGV[1])
  local _, tk = string.match(swept, '^(%d+):(%d+)')
  tokens = tokens - tonumber(tk)
  applied = 3
elseif unreserved then
  tokens = 0
  applied = 2
else
  cost, tokens = 0, 0
end
if unreserved and applied ~= 0 then redis.call('SET', charged, '1', 'EX', ARGV[11]) end
local du, mu = charge(cost, tokens, dl, ml, ARGV[6], ARGV[7], ARGV[9], ARGV[10])
return {applied, du, mu}
"""

# A chunk (chunks.py) is a reservation whose entry also says what has been charged to it:
# "held:held tokens:day:month:seq:charged:charged tokens". The sidecar sends its state
# (ARGV[3..6]: held, held tokens, charged, charged tokens) under a sequence number: a
# checkpoint older than the one applied is ignored, so one sent twice, or overtaken by a
# later one, applies once. The budgets and the rate limits move by the difference from the
# state applied before; held 0 closes the chunk. Released at its lease's end (the sweep in
# ADMIT refunds what is held, what was charged stays), a checkpoint after that charges what
# was charged since, in full, and says so (applied = 3).
CHECKPOINT = """
local base = string.sub(KEYS[1], 1, -5)
local id, seq = ARGV[1], tonumber(ARGV[2])
local hc, ht, cc, ct = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local pattern = '^(%d+):(%d+):(%d*):(%d*):?(%d*):?(%d*):?(%d*)$'
local entry = redis.call('HGET', KEYS[1], id)
local swept = not entry and redis.call('GET', base .. ':swept:' .. id)
local state = entry or swept
local cost, tokens, applied = 0, 0, 0
if state then
  local h, htk, d, m, s, c, ctk = string.match(state, pattern)
  if h and seq > (tonumber(s) or 0) then
    c, ctk = tonumber(c) or 0, tonumber(ctk) or 0
    local fmt = '%d:%d:' .. d .. ':' .. m .. ':%d:%d:%d'
    if entry then
      cost = hc + cc - tonumber(h) - c
      tokens = ht + ct - tonumber(htk) - ctk
      applied = 1
      if hc == 0 and ht == 0 then
        redis.call('HDEL', KEYS[1], id)
        redis.call('ZREM', KEYS[6], id)
      else
        redis.call('HSET', KEYS[1], id, string.format(fmt, hc, ht, seq, cc, ct))
      end
    else
      -- released: what it held was refunded (the rate limits keep it until they drain)
      cost = cc - c
      tokens = ct - tonumber(htk) - ctk
      applied = 3
      redis.call('SET', base .. ':swept:' .. id, string.format(fmt, 0, 0, seq, cc, ct), 'KEEPTTL')
    end
  end
end
local du, mu = charge(cost, tokens, ARGV[7] == '1', ARGV[8] == '1', ARGV[9], ARGV[10], ARGV[11], ARGV[12])
return {applied, du, mu}
"""

# Each id: 1 if its lease was pushed on, 0 if it has none (settled, closed, or released).
RENEW = """
local deadline = string.format('%.0f', now + tonumber(ARGV[1]))
local renewed = {}
for i = 2, #ARGV do renewed[i - 1] = redis.call('ZADD', KEYS[1], 'XX', 'CH', deadline, ARGV[i]) end
return renewed
"""

# A sidecar announces itself (id scored by Redis' time) and learns how many sidecars of the
# scope did so within ARGV[2] ms: its share of each rate limit while Redis is away.
PRESENCE = """
local ms = math.floor(now)
redis.call('ZADD', KEYS[1], ms, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ms - tonumber(ARGV[2]))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return redis.call('ZCARD', KEYS[1])
"""
PRESENCE_WINDOW_MS = 60_000


# A model's tokens per minute across tenants (GCRA): {0, 0, reset} or {1, retry after, reset}.
MODEL_RATE = """
local new, wait, owed = gcra(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]))
if not new then return {1, wait, owed} end
set_tat(KEYS[1], new)
return {0, 0, math.ceil(new - now)}
"""

# Move a GCRA TAT by ARGV[1] ms (negative: give tokens back).
MOVE = """
return move(KEYS[1], tonumber(ARGV[1]))
"""

_ADMIT, _SETTLE, _CHECKPOINT, _RENEW, _PRESENCE, _MODEL_RATE, _MOVE = (
    LuaScript(_PRELUDE + source) for source in (ADMIT, SETTLE, CHECKPOINT, RENEW, PRESENCE, MODEL_RATE, MOVE)
)

OK, BUDGET, RATE_TENANT, RATE_MODEL = 0, 1, 2, 3


def model_rate_key(scope: str, model: str) -> str:
    return f"{KEY_PREFIX}:{{policy:{scope}/model/{model}}}:rate"


def presence_key(scope: str) -> str:
    return f"{KEY_PREFIX}:{{policy:{scope}}}:sidecars"


def tenant_keys(scope: str, tenant: str, day: str, month: str, model: str | None) -> list[str]:
    base = f"{KEY_PREFIX}:{{policy:{scope}:{tenant}}}"
    return [
        f"{base}:res",
        f"{base}:budget:d:{day}",
        f"{base}:budget:m:{month}",
        f"{base}:rate",
        f"{base}:rate:m:{model or ''}",
        f"{base}:lease",
    ]


def lease_key(keys: list[str]) -> str:
    return keys[5]


@dataclass(frozen=True, slots=True)
class Admitted:
    status: int  # OK, BUDGET, RATE_TENANT, RATE_MODEL
    granted: int
    day_used: int
    month_used: int
    retry_after_ms: int  # when refused by a rate limit
    reset_ms: int  # TAT - now of the tenant limit (of the refusing one when refused)
    model_reset_ms: int
    redis_time_ms: int  # Redis' clock when it decided
    expired: int  # reservations of this tenant released because their lease ended


@dataclass(frozen=True, slots=True)
class ModelAdmitted:
    refused: bool
    retry_after_ms: int
    reset_ms: int  # TAT - now


@dataclass(frozen=True, slots=True)
class Settled:
    applied: int  # 0: already settled, 1: settled, 2: charged without one, 3: charged after its release
    day_used: int
    month_used: int


def _raised(reply: Any) -> Any:
    if isinstance(reply, Exception):
        raise reply
    return reply


class Store:
    """The scripts and commands of the policies, over one pipelined channel.

    Every method queues its commands when it is called (not when awaited), so commands
    issued together leave in one write: ``settle_many`` then ``admit`` costs one round trip.
    """

    def __init__(self, channel: Channel) -> None:
        self.channel = channel

    def admit(
        self,
        keys: list[str],
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
        args: list[Arg] = [
            id,
            cost,
            day_limit,
            month_limit,
            least,
            tokens,
            repr(tenant_rate[0]),
            repr(tenant_rate[1]),
            repr(model_rate[0]),
            repr(model_rate[1]),
            DAY_TTL_S,
            MONTH_TTL_S,
            RESERVATIONS_TTL_S,
            lease_ms,
            day,
            month,
        ]
        # ``flush``: written at once, for a request waiting on it (settlements and a model
        # check queued before it leave in the same write); a chunk asked for ahead rides in
        # the loop iteration's write instead.
        return self.channel.evalsha(
            _ADMIT, keys, args, convert=lambda r: Admitted(*(int(x) for x in _raised(r))), flush=flush
        )

    def model_rate(
        self, key: str, tokens: int, interval_ms: float, tau_ms: float
    ) -> Awaitable[ModelAdmitted]:
        """Check and take a model's limit across tenants (queued now: call it before
        ``admit``, which writes both)."""

        def convert(reply: Any) -> ModelAdmitted:
            refused, retry, reset = _raised(reply)
            return ModelAdmitted(bool(refused), int(retry), int(reset))

        args: list[Arg] = [tokens, repr(interval_ms), repr(tau_ms)]
        return self.channel.evalsha(_MODEL_RATE, [key], args, convert=convert)

    def move(self, key: str, ms: float) -> Awaitable[Any]:
        """Move a rate limit's TAT by ``ms`` (queued now; the reply says nothing useful)."""
        return self.channel.evalsha(_MOVE, [key], [repr(ms)])

    def settle_many(
        self, items: list[tuple[list[str], list[Arg]]]
    ) -> Awaitable[list[Settled | BaseException]]:
        """Settle several reservations (one ``SETTLE`` each, queued together).

        Each item is (keys, ``settle_args(...)``); each result is its ``Settled``, or the
        error of that one (a ``ResponseError`` from the script, a lost connection).
        """
        return self._many(_SETTLE, items)

    def _many(
        self, script: LuaScript, items: list[tuple[list[str], list[Arg]]]
    ) -> Awaitable[list[Settled | BaseException]]:
        """One ``script`` per item, queued now; their replies as ``Settled`` or errors."""
        return self._settled([self.channel.evalsha(script, keys, args) for keys, args in items])

    @staticmethod
    async def _settled(replies: list[asyncio.Future[Any]]) -> list[Settled | BaseException]:
        done = await asyncio.gather(*replies, return_exceptions=True)  # futures: no task each
        return [r if isinstance(r, BaseException) else Settled(*(int(x) for x in r)) for r in done]

    def checkpoint_many(
        self, items: list[tuple[list[str], list[Arg]]]
    ) -> Awaitable[list[Settled | BaseException]]:
        """Move chunks to their state (one ``CHECKPOINT`` each, queued together): each item
        is (keys, ``checkpoint_args(...)``), each result a ``Settled`` or the error of that one."""
        return self._many(_CHECKPOINT, items)

    async def announce(self, scope: str, sidecar: str) -> int:
        """Say this sidecar is alive; how many sidecars of the scope are (itself included)."""
        return int(
            _raised(
                await self.channel.evalsha(_PRESENCE, [presence_key(scope)], [sidecar, PRESENCE_WINDOW_MS])
            )
        )

    async def leave(self, scope: str, sidecar: str) -> None:
        _raised(await self.channel.send("ZREM", presence_key(scope), sidecar))

    async def renew(self, leases: dict[str, list[str]], lease_ms: int) -> set[str]:
        """Push the leases of open reservations ``lease_ms`` past now: {lease key: [ids]};
        the ids whose lease was there to push."""
        replies = [self.channel.evalsha(_RENEW, [key], [lease_ms, *ids]) for key, ids in leases.items()]
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
    return [
        id,
        cost,
        tokens,
        int(daily),
        int(monthly),
        repr(tenant_interval),
        repr(model_interval),
        int(unreserved),
        DAY_TTL_S,
        MONTH_TTL_S,
        CHARGED_TTL_S,
    ]


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
    return [
        id,
        seq,
        held[0],
        held[1],
        charged[0],
        charged[1],
        int(daily),
        int(monthly),
        repr(tenant_interval),
        repr(model_interval),
        DAY_TTL_S,
        MONTH_TTL_S,
    ]
