-- Consume an Oxlin queue: return the events after the cursor and move the cursor past them.
-- Entries up to the previous cursor were answered by the previous poll and are trimmed now;
-- keeping them one poll longer lets queue_rewind hand them out again when that answer never
-- reached the client (it disconnected while we read).
-- KEYS[1] the user's registry zset ("<base>:queues"); the queue's meta hash and stream are
-- named after it and the queue id, in its hash slot (keyspace.py): <base>:qm:<id>, <base>:q:<id>.
-- One key passed instead of three: this runs on every poll, and each argument costs encoding.
-- ARGV[1] ttl ms, ARGV[2] queue id, ARGV[3] max events, ARGV[4] poll token
-- The token names this poll. It makes the script safe to retry (a retry with the same token
-- is served the same events again, not the next ones), and queue_rewind undoes a poll by it.
-- Returns false when the queue does not exist (unknown, expired or another user's), else
-- {dropped count, entries}.
-- Every queue has a cursor from its subscription on: no cursor, no queue (one call, not an
-- EXISTS and then an HMGET; this script runs once per poll).
local registry = KEYS[1]
local base = string.sub(registry, 1, -#':queues' - 1)
local meta_key = base .. ':qm:' .. ARGV[2]
local stream = base .. ':q:' .. ARGV[2]
local meta = redis.call('HMGET', meta_key, 'cursor', 'dropped', 'ptok', 'pprev')
local cursor = meta[1]
if not cursor then return false end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
local dropped = tonumber(meta[2] or '0')
if meta[3] == ARGV[4] then
  local again = {}
  if meta[4] ~= cursor then
    again = redis.call('XRANGE', stream, '(' .. meta[4], cursor, 'COUNT', tonumber(ARGV[3]))
  end
  return {0, again}
end
-- Entries up to pprev went with the poll before; when that poll found nothing (or was
-- rewound), pprev == cursor and there is nothing to trim.
if cursor ~= '0-0' and cursor ~= meta[4] then
  local ms, seq = string.match(cursor, '^(%d+)-(%d+)$')
  redis.call('XTRIM', stream, 'MINID', ms .. '-' .. (tonumber(seq) + 1))
end
local entries = redis.call('XRANGE', stream, '(' .. cursor, '+', 'COUNT', tonumber(ARGV[3]))
local new = cursor
if #entries > 0 then new = entries[#entries][1] end
redis.call('HSET', meta_key, 'cursor', new, 'ptok', ARGV[4], 'pprev', cursor, 'dropped', 0)
-- A poll is a query: every key of the queue lives ttl longer (the Oxlin 15-minute timer).
redis.call('PEXPIRE', meta_key, ttl)
redis.call('PEXPIRE', stream, ttl)
redis.call('ZADD', registry, now + ttl, ARGV[2])
if redis.call('PTTL', registry) < ttl then redis.call('PEXPIRE', registry, ttl) end
return {dropped, entries}
