-- A sidecar announces itself (``sidecar`` scored by Redis' time) and learns how many
-- sidecars of the scope did so within ``window_ms``: its share of each rate limit while
-- Redis is away.
local ms = math.floor(now)
redis.call('ZADD', K.sidecars, ms, A.sidecar)
redis.call('ZREMRANGEBYSCORE', K.sidecars, '-inf', ms - tonumber(A.window_ms))
redis.call('PEXPIRE', K.sidecars, A.window_ms)
return redis.call('ZCARD', K.sidecars)
