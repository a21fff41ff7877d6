-- The scope's spend in one UTC hour: add ``amount`` once per batch (``K.sent`` marks it, so
-- a batch sent again after a lost reply is not added twice), answer the total.
local amount = tonumber(A.amount)
if amount > 0 and redis.call('SET', K.sent, '1', 'NX', 'EX', A.ttl_s) then
  redis.call('INCRBY', K.hour, A.amount)
  redis.call('EXPIRE', K.hour, A.ttl_s)
end
return reply{total = tonumber(redis.call('GET', K.hour) or '0')}
