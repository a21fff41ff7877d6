-- Push the leases of ``ids`` (a JSON list) ``lease_ms`` past now. Each id: 1 if its lease
-- was pushed on, 0 if it has none (settled, closed, or released).
local deadline = string.format('%.0f', now + tonumber(A.lease_ms))
local renewed = {}
for i, id in ipairs(cjson.decode(A.ids)) do
  renewed[i] = redis.call('ZADD', K.lease, 'XX', 'CH', deadline, id)
end
return renewed
