-- A model's tokens per minute across tenants (GCRA): take ``tokens``, or refuse.
local new, wait, owed = gcra(K.rate, tonumber(A.tokens), tonumber(A.interval_ms), tonumber(A.tau_ms))
if not new then return reply{refused = 1, retry_after_ms = wait, reset_ms = owed} end
set_tat(K.rate, new)
return reply{refused = 0, retry_after_ms = 0, reset_ms = math.ceil(new - now)}
