-- One RFC 8936 poll of one OB client, atomically: apply acks, record nacks (setErrs), bring
-- back SETs whose lease ended, drop SETs past the retention, select the oldest ready SETs.
-- Concurrent polls of one client are serialised by Redis, so none loses or double-counts an ack.
-- KEYS[1] all unacked (zset), KEYS[2] ready (zset), KEYS[3] leased (zset), KEYS[4] jws (hash),
-- KEYS[5] nacked (hash)
-- ARGV[1] max SETs to return (0: none), ARGV[2] lease ms (0: redeliver on every poll),
-- ARGV[3] retention ms, ARGV[4] nack record TTL ms,
-- ARGV[5] ack count a, then a jtis, then nack count e, then e pairs (jti, error JSON object)
-- Returns {acked, nacked, expired, more (0/1), ms until the next lease ends (-1: none),
--          {jti, jws, jti, jws, ...}}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit = tonumber(ARGV[1])
local lease = tonumber(ARGV[2])

local function forget(jti)
  redis.call('ZREM', KEYS[2], jti)
  redis.call('ZREM', KEYS[3], jti)
  redis.call('HDEL', KEYS[4], jti)
end

-- Acks: unknown, foreign (another client's keys are never touched) or repeated jtis are no-ops.
local acked = 0
local a = tonumber(ARGV[5])
local at = 6
for i = at, at + a - 1 do
  if redis.call('ZREM', KEYS[1], ARGV[i]) == 1 then
    forget(ARGV[i])
    acked = acked + 1
  end
end
at = at + a

-- Nacks: the SET is never delivered again but kept, with the error, for the operator.
local nacked = 0
local e = tonumber(ARGV[at])
at = at + 1
for i = 0, e - 1 do
  local jti = ARGV[at + 2 * i]
  if redis.call('ZREM', KEYS[1], jti) == 1 then
    local jws = redis.call('HGET', KEYS[4], jti) or ''
    forget(jti)
    -- The error object is built (and escaped) by the caller; the JWS needs no escaping.
    redis.call('HSET', KEYS[5], jti, '{"set":"' .. jws .. '",' .. string.sub(ARGV[at + 2 * i + 1], 2))
    nacked = nacked + 1
  end
end
if nacked > 0 then redis.call('PEXPIRE', KEYS[5], tonumber(ARGV[4])) end

-- Leases that ended: those SETs are deliverable again, in their original order.
local now_s = string.format('%.0f', now)
local back = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now_s)
for _, jti in ipairs(back) do
  local score = redis.call('ZSCORE', KEYS[1], jti)
  if score then redis.call('ZADD', KEYS[2], score, jti) end
end
if #back > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now_s) end

-- Retention: unacked SETs published before the cutoff are dropped and counted.
local cutoff = string.format('%.0f', (now - tonumber(ARGV[3])) * 1000)
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

-- Selection: oldest first. HMGET/ZREM go in chunks: Lua's unpack() is limited to ~8000 values.
local out = {}
local picked = 0
if limit > 0 then
  local ids = redis.call('ZRANGE', KEYS[2], 0, limit - 1)
  local until_ms = string.format('%.0f', now + lease)
  for from = 1, #ids, 500 do
    local chunk = {}
    for i = from, math.min(from + 499, #ids) do chunk[#chunk + 1] = ids[i] end
    local bodies = redis.call('HMGET', KEYS[4], unpack(chunk))
    for i, jti in ipairs(chunk) do
      if bodies[i] then
        out[#out + 1] = jti
        out[#out + 1] = bodies[i]
        picked = picked + 1
        if lease > 0 then redis.call('ZADD', KEYS[3], until_ms, jti) end
      else
        -- A jti without its JWS cannot be delivered; drop it rather than return it forever.
        redis.call('ZREM', KEYS[1], jti)
        redis.call('ZREM', KEYS[2], jti)
      end
    end
    if lease > 0 then redis.call('ZREM', KEYS[2], unpack(chunk)) end
  end
end

local left = redis.call('ZCARD', KEYS[2])
if lease == 0 then left = left - picked end
local more = 0
if left > 0 then more = 1 end
local next_ms = -1
local first = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
if #first > 0 then next_ms = math.max(0, tonumber(first[2]) - now) end
return {acked, nacked, expired, more, next_ms, out}
