-- Consume an Oxlin queue: return the events after the cursor and move the cursor past them.
-- Entries up to the previous cursor were answered by the previous poll and are trimmed now;
-- keeping them one poll longer lets queue_rewind hand them out again when that answer never
-- reached the client (it disconnected while we read).
-- KEYS[1] registry zset, KEYS[2] queue meta hash, KEYS[3] queue stream
-- ARGV[1] ttl ms, ARGV[2] queue id, ARGV[3] max events
-- Returns false when the queue does not exist (unknown, expired or another user's), else
-- {previous cursor, new cursor, dropped count, entries}.
if redis.call('EXISTS', KEYS[2]) == 0 then return false end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
local meta = redis.call('HMGET', KEYS[2], 'cursor', 'dropped')
local cursor = meta[1]
local dropped = tonumber(meta[2] or '0')
if cursor ~= '0-0' then
  local ms, seq = string.match(cursor, '^(%d+)-(%d+)$')
  redis.call('XTRIM', KEYS[3], 'MINID', ms .. '-' .. (tonumber(seq) + 1))
end
local entries = redis.call('XRANGE', KEYS[3], '(' .. cursor, '+', 'COUNT', tonumber(ARGV[3]))
local new = cursor
if #entries > 0 then new = entries[#entries][1] end
if new ~= cursor or dropped > 0 then
  redis.call('HSET', KEYS[2], 'cursor', new, 'dropped', 0)
end
-- A poll is a query: every key of the queue lives ttl longer (the Oxlin 15-minute timer).
redis.call('PEXPIRE', KEYS[2], ttl)
redis.call('PEXPIRE', KEYS[3], ttl)
redis.call('ZADD', KEYS[1], now + ttl, ARGV[2])
if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
return {cursor, new, dropped, entries}
