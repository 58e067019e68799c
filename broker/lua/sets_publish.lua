-- Queue signed SETs for one OB client, in one atomic step with its subscription check:
-- a SET is queued only if the client has a subscription whose EventTypes include at least
-- one of the SET's event types ("*": all types; a 3.1.1 subscription: resource-update only).
-- KEYS[1] all unacked (zset), KEYS[2] ready (zset), KEYS[3] leased (zset), KEYS[4] jws (hash),
-- KEYS[5] order score counter, KEYS[6] subscription (hash)
-- ARGV[1] retention ms, ARGV[2] SET count n, then n triples (jti, compact JWS, ",Code,...,")
-- Returns {per-SET flags: 1 queued, 0 no subscription, -1 event types not subscribed,
--          number of unacked SETs dropped for being older than the retention,
--          the subscription's CallbackUrl or ''}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = tonumber(ARGV[2])

-- Retention first, so a client that never polls still has a bounded store.
local cutoff = string.format('%.0f', (now - tonumber(ARGV[1])) * 1000)
local expired = 0
while true do
  local old = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', '(' .. cutoff, 'LIMIT', 0, 500)
  if #old == 0 then break end
  redis.call('ZREM', KEYS[1], unpack(old))
  redis.call('ZREM', KEYS[2], unpack(old))
  redis.call('ZREM', KEYS[3], unpack(old))
  redis.call('HDEL', KEYS[4], unpack(old))
  expired = expired + #old
end

local sub = redis.call('HMGET', KEYS[6], 'types', 'version', 'callback')
local types = sub[1]
-- A subscription made on version 3.1.1 gets resource-update events only (OB event-notification
-- API profile, backwards compatibility): if its EventTypes include them (or are omitted), and
-- only SETs that carry nothing else.
local only_update = false
if types and sub[2] == '3.1.1' then
  only_update = true
  if types == '*' or string.find(types, ',UK.OBIE.Resource-Update,', 1, true) then
    types = ',UK.OBIE.Resource-Update,'
  else
    types = ','
  end
end
local flags = {}
-- Order scores are publish ms * 1000 + a counter, never reused and always increasing, so
-- "oldest first" is exact within one millisecond and the score still tells the age.
local last = tonumber(redis.call('GET', KEYS[5]) or '0')
local queued = 0
for i = 1, n do
  local jti = ARGV[3 * i]
  local jws = ARGV[3 * i + 1]
  local wanted = ARGV[3 * i + 2]
  local flag = 0
  if types then
    flag = -1
    if only_update and wanted ~= ',UK.OBIE.Resource-Update,' then
      flag = -1
    elseif types == '*' then
      flag = 1
    else
      for code in string.gmatch(wanted, '[^,]+') do
        if string.find(types, ',' .. code .. ',', 1, true) then flag = 1 break end
      end
    end
  end
  if flag == 1 then
    local score = math.max(now * 1000, last + 1)
    last = score
    local s = string.format('%.0f', score)
    redis.call('ZADD', KEYS[1], s, jti)
    redis.call('ZADD', KEYS[2], s, jti)
    redis.call('HSET', KEYS[4], jti, jws)
    queued = queued + 1
  end
  flags[i] = flag
end
if queued > 0 then redis.call('SET', KEYS[5], string.format('%.0f', last)) end
-- The subscription's callback ('' if none): the caller schedules the real-time push.
return {flags, expired, sub[3] or ''}
