-- A chunk (chunks.py) is a reservation whose entry also says what has been charged to it:
-- "held:held tokens:day:month:seq:charged:charged tokens". The sidecar sends its state
-- (held, held tokens, charged, charged tokens) under a sequence number: a checkpoint older
-- than the one applied is ignored, so one sent twice, or overtaken by a later one, applies
-- once. The budgets and the rate limits move by the difference from the state applied
-- before; held 0 closes the chunk. Released at its lease's end (the sweep in admit.lua
-- refunds what is held, what was charged stays), a checkpoint after that charges what was
-- charged since, in full, and says so (Applied.RELEASED).
local base = string.sub(K.res, 1, -5)
local id, seq = A.id, tonumber(A.seq)
local hc, ht = tonumber(A.held_cost), tonumber(A.held_tokens)
local cc, ct = tonumber(A.charged_cost), tonumber(A.charged_tokens)
local pattern = '^(%d+):(%d+):(%d*):(%d*):?(%d*):?(%d*):?(%d*)$'
local entry = redis.call('HGET', K.res, id)
local swept = not entry and redis.call('GET', base .. ':swept:' .. id)
local state = entry or swept
local cost, tokens, applied = 0, 0, Applied.NONE
if state then
  local h, htk, d, m, s, c, ctk = string.match(state, pattern)
  if h and seq > (tonumber(s) or 0) then
    c, ctk = tonumber(c) or 0, tonumber(ctk) or 0
    local fmt = '%d:%d:' .. d .. ':' .. m .. ':%d:%d:%d'
    if entry then
      cost = hc + cc - tonumber(h) - c
      tokens = ht + ct - tonumber(htk) - ctk
      applied = Applied.RESERVED
      if hc == 0 and ht == 0 then
        redis.call('HDEL', K.res, id)
        redis.call('ZREM', K.lease, id)
      else
        redis.call('HSET', K.res, id, string.format(fmt, hc, ht, seq, cc, ct))
      end
    else
      -- released: what it held was refunded (the rate limits keep it until they drain)
      cost = cc - c
      tokens = ct - tonumber(htk) - ctk
      applied = Applied.RELEASED
      redis.call('SET', base .. ':swept:' .. id, string.format(fmt, 0, 0, seq, cc, ct), 'KEEPTTL')
    end
  end
end
local du, mu = charge(
  cost, tokens, A.daily == '1', A.monthly == '1', A.tenant_interval, A.model_interval,
  A.day_ttl, A.month_ttl
)
return reply{applied = applied, day_used = du, month_used = mu}
