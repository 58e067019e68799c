-- Claim the pushes that fell due, for one worker: each is pushed forward by a lease, so
-- another worker (or this one after a crash) takes it again only once the lease is over.
-- KEYS[1] schedule (zset); ARGV[1] now (ms), ARGV[2] lease (ms), ARGV[3] most to claim.
-- Returns the members claimed ("<client id>\n<jti>").
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[3]))
local until_ms = tonumber(ARGV[1]) + tonumber(ARGV[2])
for _, member in ipairs(due) do
  redis.call('ZADD', KEYS[1], until_ms, member)
end
return due
