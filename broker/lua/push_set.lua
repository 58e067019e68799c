-- Schedule pushes of one TPP's SETs for a time (a publish: now; a retry: after its backoff),
-- or, with no time, take them off the schedule (pushed, refused or given up on), with their
-- attempt counts. The TPP's entry among the TPPs always ends as its queue's lowest score.
-- KEYS[1] the TPPs zset, KEYS[2] this TPP's queue, KEYS[3] the attempts hash.
-- ARGV[1] client id, ARGV[2] when (ms) or "" to remove, then the jtis.
local tpps, q = KEYS[1], KEYS[2]
local client = ARGV[1]
if ARGV[2] == '' then
  for i = 3, #ARGV do
    redis.call('ZREM', q, ARGV[i])
    redis.call('HDEL', KEYS[3], client .. '\n' .. ARGV[i])
  end
else
  local at = tonumber(ARGV[2])
  for i = 3, #ARGV do redis.call('ZADD', q, at, ARGV[i]) end
end
local first = redis.call('ZRANGE', q, 0, 0, 'WITHSCORES')
if #first == 0 then
  redis.call('ZREM', tpps, client)
else
  redis.call('ZADD', tpps, first[2], client)
end
return #first
