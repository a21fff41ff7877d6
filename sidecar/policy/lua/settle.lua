-- Move a reservation to the real usage (``cost``, ``tokens``), once: see store.py.
local base = string.sub(K.res, 1, -5)
local cost, tokens = tonumber(A.cost), tonumber(A.tokens)
local dl, ml = A.daily == '1', A.monthly == '1'
-- Admitted without Redis (fail-open): whichever branch charges it, it is charged once.
local unreserved = A.unreserved == '1'
local charged = base .. ':charged:' .. A.id
local done = unreserved and redis.call('EXISTS', charged) == 1
local held = not done and redis.call('HGET', K.res, A.id)
local swept = not done and not held and redis.call('GET', base .. ':swept:' .. A.id)
local applied = Applied.NONE
if done then
  cost, tokens = 0, 0
elseif held then
  redis.call('HDEL', K.res, A.id)
  redis.call('ZREM', K.lease, A.id)
  local c, tk = string.match(held, '^(%d+):(%d+)')
  cost = cost - tonumber(c)
  tokens = tokens - tonumber(tk)
  applied = Applied.RESERVED
elseif swept then
  -- released when its lease ended (budget refunded, rate limits not): charge in full
  redis.call('DEL', base .. ':swept:' .. A.id)
  local _, tk = string.match(swept, '^(%d+):(%d+)')
  tokens = tokens - tonumber(tk)
  applied = Applied.RELEASED
elseif unreserved then
  tokens = 0
  applied = Applied.UNRESERVED
else
  cost, tokens = 0, 0
end
if unreserved and applied ~= Applied.NONE then redis.call('SET', charged, '1', 'EX', A.charged_ttl) end
local du, mu = charge(
  cost, tokens, dl, ml, A.tenant_interval, A.model_interval, A.day_ttl, A.month_ttl
)
return reply{applied = applied, day_used = du, month_used = mu}
