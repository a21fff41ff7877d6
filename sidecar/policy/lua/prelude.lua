-- Ahead of every policy script, after the header scripts.py builds: the keys by name in
-- ``K``, the arguments by name in ``A``, ``reply{...}`` to answer by name, the reply codes in
-- ``Admit`` and ``Applied``.
-- Redis' clock in ms (``now``), and the GCRA on one TAT key: ``gcra`` checks a take and
-- writes nothing, ``set_tat`` writes, ``move`` shifts a TAT by ``ms`` (negative: gives
-- tokens back; a TAT that falls into the past is gone); ``charge`` applies a settlement's
-- difference to a tenant's budgets and rate limits.
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
-- A tenant's keys (store.TenantKeys): add ``cost`` to the budgets kept (daily, monthly) and
-- move both rate limits' TATs by ``tokens``; returns the budgets used after it.
local function charge(cost, tokens, daily, monthly, tenant_interval, model_interval, day_ttl, month_ttl)
  local used = {0, 0}
  for i, kept in ipairs({daily, monthly}) do
    if kept then
      local key = i == 1 and K.day or K.month
      if cost ~= 0 then
        used[i] = redis.call('INCRBY', key, string.format('%d', cost))
        redis.call('EXPIRE', key, i == 1 and day_ttl or month_ttl)
      else used[i] = tonumber(redis.call('GET', key) or '0') end
    end
  end
  if tokens ~= 0 then
    for i, interval in ipairs({tonumber(tenant_interval), tonumber(model_interval)}) do
      if interval > 0 then move(i == 1 and K.rate or K.model_rate, tokens * interval) end
    end
  end
  return used[1], used[2]
end
