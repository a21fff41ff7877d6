"""The policies' shared state in Redis: one Lua script to admit, one to settle (thin I/O).

Keys, one set per tenant in its own Redis Cluster slot (the ``{...}`` hash tag), so both
scripts touch only keys of one slot::

    tokenscaler:v1:{policy:<scope>:<tenant>}:budget:d:<YYYYMMDD>   used today (tokens or 1e-9 money)
    tokenscaler:v1:{policy:<scope>:<tenant>}:budget:m:<YYYYMM>     used this month
    tokenscaler:v1:{policy:<scope>:<tenant>}:rate                  GCRA TAT (ms, Redis clock)
    tokenscaler:v1:{policy:<scope>:<tenant>}:rate:m:<model>        GCRA TAT of a per-model limit
    tokenscaler:v1:{policy:<scope>:<tenant>}:res                   open reservations: id -> "cost:tokens"

``ADMIT`` (one round trip per request) reads the budgets, grants the reservation (all of it,
or under ``onShortfall: shorten`` what is left if that is at least the minimum), checks
both rate limits for the granted tokens, and only if everything passes commits all of it
and records the reservation. Scripts run atomically, so concurrent requests from any
number of sidecars see each other's reservations: used + reserved never passes a limit.

``SETTLE`` moves a reservation to the real usage: it removes the reservation and adds
``real - reserved`` (negative: a refund) to the budgets and the rate limits' TATs. It is
idempotent (a reservation is settled once; a retried call finds it gone and does nothing),
so a settle whose reply was lost can be sent again without a double refund. For requests
admitted while Redis was away (fail-open) it charges the real usage instead, once.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from token_scaler.record import KEY_PREFIX

RESERVATIONS_TTL_S = 3 * 86_400
DAY_TTL_S = 3 * 86_400
MONTH_TTL_S = 40 * 86_400

ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local cost, dl, ml = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local du, mu = 0, 0
if dl > 0 then du = tonumber(redis.call('GET', KEYS[2]) or '0') end
if ml > 0 then mu = tonumber(redis.call('GET', KEYS[3]) or '0') end
local granted = cost
if dl > 0 and dl - du < granted then granted = dl - du end
if ml > 0 and ml - mu < granted then granted = ml - mu end
if granted < cost then
  local least = tonumber(ARGV[5])
  if least <= 0 or granted < least then return {1, 0, du, mu, 0, 0, 0} end
end
local tokens = tonumber(ARGV[6])
if granted < cost and cost > 0 then tokens = math.ceil(tokens * granted / cost) end
local tats = {0, 0}
for i = 1, 2 do
  local interval, tau = tonumber(ARGV[5 + 2 * i]), tonumber(ARGV[6 + 2 * i])
  if interval > 0 then
    local tat = tonumber(redis.call('GET', KEYS[3 + i]) or '0')
    if tat < now then tat = now end
    local new = tat + tokens * interval
    local need = tau
    if tokens * interval > need then need = tokens * interval end
    if new - need > now then
      return {1 + i, 0, du, mu, math.ceil(new - need - now), math.ceil(tat - now), 0}
    end
    tats[i] = new
  end
end
for i = 1, 2 do
  if tats[i] > 0 then
    redis.call('SET', KEYS[3 + i], string.format('%.3f', tats[i]), 'PX', math.ceil(tats[i] - now) + 1)
  end
end
local g = string.format('%d', granted)
if dl > 0 then du = redis.call('INCRBY', KEYS[2], g); redis.call('EXPIRE', KEYS[2], ARGV[11]) end
if ml > 0 then mu = redis.call('INCRBY', KEYS[3], g); redis.call('EXPIRE', KEYS[3], ARGV[12]) end
redis.call('HSET', KEYS[1], ARGV[1], g .. ':' .. string.format('%d', tokens))
redis.call('EXPIRE', KEYS[1], ARGV[13])
local r1, r2 = 0, 0
if tats[1] > 0 then r1 = math.ceil(tats[1] - now) end
if tats[2] > 0 then r2 = math.ceil(tats[2] - now) end
return {0, granted, du, mu, 0, r1, r2}
"""

SETTLE = """
local held = redis.call('HGET', KEYS[1], ARGV[1])
local cost, tokens = tonumber(ARGV[2]), tonumber(ARGV[3])
local dl, ml = ARGV[4] == '1', ARGV[5] == '1'
local applied = 0
if held then
  redis.call('HDEL', KEYS[1], ARGV[1])
  local sep = string.find(held, ':', 1, true)
  cost = cost - tonumber(string.sub(held, 1, sep - 1))
  tokens = tokens - tonumber(string.sub(held, sep + 1))
  applied = 1
elseif ARGV[8] == '1' then
  tokens = 0
  applied = 2
else
  cost, tokens = 0, 0
end
local du, mu = 0, 0
if dl then
  if cost ~= 0 then
    du = redis.call('INCRBY', KEYS[2], string.format('%d', cost)); redis.call('EXPIRE', KEYS[2], ARGV[9])
  else du = tonumber(redis.call('GET', KEYS[2]) or '0') end
end
if ml then
  if cost ~= 0 then
    mu = redis.call('INCRBY', KEYS[3], string.format('%d', cost)); redis.call('EXPIRE', KEYS[3], ARGV[10])
  else mu = tonumber(redis.call('GET', KEYS[3]) or '0') end
end
if tokens ~= 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
  for i = 1, 2 do
    local interval = tonumber(ARGV[5 + i])
    local tat = interval > 0 and tonumber(redis.call('GET', KEYS[3 + i]) or '0') or 0
    if tat > 0 then
      tat = tat + tokens * interval
      if tat > now then
        redis.call('SET', KEYS[3 + i], string.format('%.3f', tat), 'PX', math.ceil(tat - now) + 1)
      else
        redis.call('DEL', KEYS[3 + i])
      end
    end
  end
end
return {applied, du, mu}
"""

OK, BUDGET, RATE_TENANT, RATE_MODEL = 0, 1, 2, 3


def tenant_keys(scope: str, tenant: str, day: str, month: str, model: str | None) -> list[str]:
    base = f"{KEY_PREFIX}:{{policy:{scope}:{tenant}}}"
    return [
        f"{base}:res",
        f"{base}:budget:d:{day}",
        f"{base}:budget:m:{month}",
        f"{base}:rate",
        f"{base}:rate:m:{model or ''}",
    ]


@dataclass(frozen=True, slots=True)
class Admitted:
    status: int  # OK, BUDGET, RATE_TENANT, RATE_MODEL
    granted: int
    day_used: int
    month_used: int
    retry_after_ms: int  # when refused by a rate limit
    reset_ms: int  # TAT - now of the tenant limit (of the refusing one when refused)
    model_reset_ms: int


@dataclass(frozen=True, slots=True)
class Settled:
    applied: int  # 0: already settled, 1: reservation settled, 2: charged without one
    day_used: int
    month_used: int


class Store:
    def __init__(self, client: aioredis.Redis) -> None:
        self._admit = client.register_script(ADMIT)
        self._settle = client.register_script(SETTLE)
        self.client = client

    async def admit(
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
    ) -> Admitted:
        reply = await self._admit(
            keys=keys,
            args=[
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
            ],
        )
        return Admitted(*(int(x) for x in reply))

    async def settle_many(self, items: list[tuple[list[str], list[object]]]) -> list[Settled]:
        """Settle several reservations in one round trip (a pipeline of ``SETTLE`` calls).

        Each item is (keys, ``settle_args(...)``). A pipeline would check that the script
        is loaded with an extra round trip every time; instead the rare ``NOSCRIPT`` (a
        restarted or flushed Redis) loads it and sends the batch again: settling twice is
        harmless, the script is idempotent.
        """
        for attempt in range(2):
            pipe = self.client.pipeline(transaction=False)
            for keys, args in items:
                pipe.execute_command("EVALSHA", self._settle.sha, len(keys), *keys, *args)
            replies = await pipe.execute(raise_on_error=False)
            if attempt == 0 and any(isinstance(r, NoScriptError) for r in replies):
                self._settle.sha = await self.client.script_load(SETTLE)
                continue
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
            return [Settled(*(int(x) for x in reply)) for reply in replies]
        raise AssertionError("unreachable")


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
) -> list[object]:
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
    ]
