-- Claim the pushes that fell due, for one worker: each is pushed forward by a lease, so
-- another worker (or this one after a crash) takes it again only once the lease is over.
-- The schedule is two-level (keyspace.py): TPPs ordered by their earliest due push, and per
-- TPP its SETs. A claim walks TPPs, so a TPP with a backlog of any size is one entry, and at
-- most ARGV[4] of a TPP's pushes are in flight in this worker: an endpoint that hangs holds
-- a few of the worker's slots, and the other TPPs' pushes go on.
-- KEYS[1] the TPPs zset; each TPP's queue is named after it (<base>:q:<client id>).
-- ARGV[1] now (ms), ARGV[2] lease (ms), ARGV[3] most to claim, ARGV[4] cap per TPP, then
-- pairs (client id, pushes of it in flight in this worker).
-- Returns {client id, jti, client id, jti, ...}.
local tpps = KEYS[1]
local base = string.sub(tpps, 1, -#':tpps' - 1)
local now, room, cap = tonumber(ARGV[1]), tonumber(ARGV[3]), tonumber(ARGV[4])
local until_ms = now + tonumber(ARGV[2])
local busy, capped = {}, 0
for i = 5, #ARGV, 2 do
  local n = tonumber(ARGV[i + 1])
  busy[ARGV[i]] = n
  if n >= cap then capped = capped + 1 end
end
-- Every due TPP below its cap yields at least one push (its score is its earliest due SET),
-- so room + the TPPs at their cap is as far as a claim needs to look.
local due = redis.call('ZRANGEBYSCORE', tpps, '-inf', now, 'LIMIT', 0, room + capped)
local claimed = {}
local taken = 0
for _, client in ipairs(due) do
  if taken >= room then break end
  local free = cap - (busy[client] or 0)
  if free > 0 then
    local q = base .. ':q:' .. client
    local jtis = redis.call('ZRANGEBYSCORE', q, '-inf', now, 'LIMIT', 0, math.min(free, room - taken))
    for _, jti in ipairs(jtis) do
      redis.call('ZADD', q, until_ms, jti)
      claimed[#claimed + 1] = client
      claimed[#claimed + 1] = jti
      taken = taken + 1
    end
    local first = redis.call('ZRANGE', q, 0, 0, 'WITHSCORES')
    if #first == 0 then
      redis.call('ZREM', tpps, client)
    else
      redis.call('ZADD', tpps, first[2], client)
    end
  end
end
return claimed
