-- Schedule pushes of one TPP's SETs for a time (a publish: now; a retry: after its backoff),
-- or, with no time, take them off the schedule (pushed, refused or given up on), with their
-- attempt counts. The TPP's entry among the TPPs always ends as its queue's lowest score.
-- KEYS[1] the TPPs zset, KEYS[2] this TPP's queue, KEYS[3] the attempts hash.
-- ARGV[1] client id, ARGV[2] when (ms) or "" to remove, ARGV[3] "" or the lease end of the
-- claim the caller holds: then only SETs still at that score are moved (a claim whose lease
-- ran out may have been taken over by another worker, whose claim stands), then the jtis.
local tpps, q = KEYS[1], KEYS[2]
local client = ARGV[1]
local held = tonumber(ARGV[3])
for i = 4, #ARGV do
  local jti = ARGV[i]
  if not held or tonumber(redis.call('ZSCORE', q, jti)) == held then
    if ARGV[2] == '' then
      redis.call('ZREM', q, jti)
      redis.call('HDEL', KEYS[3], client .. '\n' .. jti)
    else
      redis.call('ZADD', q, tonumber(ARGV[2]), jti)
    end
  end
end
local first = redis.call('ZRANGE', q, 0, 0, 'WITHSCORES')
if #first == 0 then
  redis.call('ZREM', tpps, client)
else
  redis.call('ZADD', tpps, first[2], client)
end
return #first
