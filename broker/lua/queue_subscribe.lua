-- Create an Oxlin queue.
-- KEYS[1] registry zset, KEYS[2] queue meta hash
-- ARGV[1] ttl ms, ARGV[2] queue id, ARGV[3] topics as ",a,b,"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
redis.call('HSET', KEYS[2], 'topics', ARGV[3], 'cursor', '0-0', 'dropped', 0)
redis.call('PEXPIRE', KEYS[2], ttl)
-- Forget queues that expired, then register this one with its idle deadline.
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + ttl, ARGV[2])
if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
return now
