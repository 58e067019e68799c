-- Fan a batch of events out to every live queue of one user subscribed to each event's topic,
-- in one atomic step: no queue ever holds half a batch.
-- KEYS[1] registry zset, KEYS[2] event id counter, KEYS[3] idempotency record of this request
-- ARGV[1] key base of the user ("brk:{u:...}"), ARGV[2] stream cap (MAXLEN),
-- ARGV[3] event count n, then n triples (topic, id or "" to assign one, JSON body without "id"),
-- then the idempotency record's lifetime in seconds.
-- Returns {ids, number of queues that received at least one event}. A request whose record
-- exists (a retry after a lost reply, or a producer's repeated Idempotency-Key) gets the
-- first answer again and stores nothing.
local done = redis.call('HMGET', KEYS[3], 'ids', 'queues')
if done[1] then
  local ids = {}
  for id in string.gmatch(done[1], '[^,]+') do ids[#ids + 1] = id end
  return {ids, tonumber(done[2])}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local base = ARGV[1]
local cap = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
-- Ids increase per user; a producer-supplied id is kept as given.
local ids = {}
local assign = 0
for i = 1, n do if ARGV[3 + 3 * i - 1] == '' then assign = assign + 1 end end
local next_id = 0
if assign > 0 then next_id = redis.call('INCRBY', KEYS[2], assign) - assign + 1 end
for i = 1, n do
  local given = ARGV[3 + 3 * i - 1]
  if given == '' then
    ids[i] = tostring(next_id)
    next_id = next_id + 1
  else
    ids[i] = given
  end
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local qids = redis.call('ZRANGE', KEYS[1], 0, -1)
local reached = 0
for _, qid in ipairs(qids) do
  local meta = base .. ':qm:' .. qid
  local m = redis.call('HMGET', meta, 'topics', 'cursor')
  local topics = m[1]
  if topics then
    local stream = base .. ':q:' .. qid
    local added = 0
    for i = 1, n do
      local topic = ARGV[3 + 3 * i - 2]
      if string.find(topics, ',' .. topic .. ',', 1, true) then
        if redis.call('XLEN', stream) >= cap then
          -- Make room from events already answered first; count what is lost beyond that.
          local cursor = m[2]
          if cursor ~= '0-0' then
            local ms, seq = string.match(cursor, '^(%d+)-(%d+)$')
            redis.call('XTRIM', stream, 'MINID', ms .. '-' .. (tonumber(seq) + 1))
          end
          if redis.call('XLEN', stream) >= cap then redis.call('HINCRBY', meta, 'dropped', 1) end
        end
        redis.call('XADD', stream, 'MAXLEN', cap, '*', 'i', ids[i], 'e', ARGV[3 + 3 * i])
        added = added + 1
      end
    end
    if added > 0 then
      reached = reached + 1
      redis.call('PEXPIRE', stream, redis.call('PTTL', meta))
    end
  else
    redis.call('ZREM', KEYS[1], qid)
  end
end
redis.call('HSET', KEYS[3], 'ids', table.concat(ids, ','), 'queues', reached)
redis.call('EXPIRE', KEYS[3], tonumber(ARGV[4 + 3 * n]))
return {ids, reached}
