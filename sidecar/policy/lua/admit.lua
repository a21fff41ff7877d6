-- Release the tenant's reservations whose lease ended (at most 32), then reserve ``cost``
-- (all of it, or under ``least`` > 0 what is left if that is at least ``least``) and pass
-- both rate limits for the tokens granted; commit all of it only if everything passes.
local expired = redis.call('ZRANGEBYSCORE', K.lease, '-inf', now, 'LIMIT', 0, 32)
if #expired > 0 then
  local base = string.sub(K.res, 1, -5)
  for _, id in ipairs(expired) do
    local held = redis.call('HGET', K.res, id)
    if held then
      local c, _, d, m = string.match(held, '^(%d+):(%d+):(%d*):(%d*)')
      if c and c ~= '0' then
        for _, k in ipairs({d ~= '' and base .. ':budget:d:' .. d, m ~= '' and base .. ':budget:m:' .. m}) do
          if k and redis.call('EXISTS', k) == 1 then redis.call('DECRBY', k, c) end
        end
      end
      redis.call('HDEL', K.res, id)
      redis.call('SET', base .. ':swept:' .. id, held, 'EX', A.reservations_ttl)
    end
  end
  redis.call('ZREM', K.lease, unpack(expired))
end
local cost, dl, ml = tonumber(A.cost), tonumber(A.day_limit), tonumber(A.month_limit)
local du, mu = 0, 0
local function answer(status, granted, retry_after, reset, model_reset)
  return reply{
    status = status, granted = granted, day_used = du, month_used = mu,
    retry_after_ms = retry_after, reset_ms = reset, model_reset_ms = model_reset,
    redis_time_ms = now, expired = #expired,
  }
end
if dl > 0 then du = tonumber(redis.call('GET', K.day) or '0') end
if ml > 0 then mu = tonumber(redis.call('GET', K.month) or '0') end
local granted = cost
if dl > 0 and dl - du < granted then granted = dl - du end
if ml > 0 and ml - mu < granted then granted = ml - mu end
if granted < cost then
  local least = tonumber(A.least)
  if least <= 0 or granted < least then return answer(Admit.BUDGET, 0, 0, 0, 0) end
end
local tokens = tonumber(A.tokens)
if granted < cost and cost > 0 then tokens = math.ceil(tokens * granted / cost) end
local limits = {
  {key = K.rate, interval = tonumber(A.tenant_interval), tau = tonumber(A.tenant_tau),
   refused = Admit.RATE_TENANT, tat = 0},
  {key = K.model_rate, interval = tonumber(A.model_interval), tau = tonumber(A.model_tau),
   refused = Admit.RATE_MODEL, tat = 0},
}
for _, limit in ipairs(limits) do
  if limit.interval > 0 then
    local new, wait, owed = gcra(limit.key, tokens, limit.interval, limit.tau)
    if not new then return answer(limit.refused, 0, wait, owed, 0) end
    limit.tat = new
  end
end
for _, limit in ipairs(limits) do
  if limit.tat > 0 then set_tat(limit.key, limit.tat) end
end
local g = string.format('%d', granted)
if dl > 0 then du = redis.call('INCRBY', K.day, g); redis.call('EXPIRE', K.day, A.day_ttl) end
if ml > 0 then mu = redis.call('INCRBY', K.month, g); redis.call('EXPIRE', K.month, A.month_ttl) end
local day, month = '', ''
if dl > 0 then day = A.day end
if ml > 0 then month = A.month end
redis.call('HSET', K.res, A.id, g .. ':' .. string.format('%d', tokens) .. ':' .. day .. ':' .. month)
redis.call('EXPIRE', K.res, A.reservations_ttl)
redis.call('ZADD', K.lease, string.format('%.0f', now + tonumber(A.lease_ms)), A.id)
redis.call('EXPIRE', K.lease, A.reservations_ttl)
local resets = {0, 0}
for i, limit in ipairs(limits) do
  if limit.tat > 0 then resets[i] = math.ceil(limit.tat - now) end
end
return answer(Admit.OK, granted, 0, resets[1], resets[2])
