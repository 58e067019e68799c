-- One RFC 8936 poll of one OB client, atomically: apply acks, record nacks (setErrs), bring
-- back SETs whose lease ended, drop SETs past the retention, select the oldest ready SETs.
-- Concurrent polls of one client are serialised by Redis, so none loses or double-counts an ack.
-- KEYS[1] all unacked (zset); the client's other keys are named after it, in its hash slot
-- (keyspace.py): <KEYS[1]>:ready (zset), :lease (zset), :jws (hash), :nacked (hash). One key
-- passed instead of five: this runs on every OB poll, and each argument costs encoding.
-- ARGV[1] max SETs to return (0: none), ARGV[2] lease ms (0: redeliver on every poll),
-- ARGV[3] retention ms (nack records are kept as long),
-- ARGV[4] ack count a, then a jtis, then nack count e, then e pairs (jti, error JSON object)
-- Returns {acked, nacked, expired, more (0/1), ms until the next lease ends (-1: none),
--          {jti, jws, jti, jws, ...}}.
local all = KEYS[1]
local ready = all .. ':ready'
local leased = all .. ':lease'
local jwss = all .. ':jws'
local nacks = all .. ':nacked'
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit = tonumber(ARGV[1])
local lease = tonumber(ARGV[2])

local function forget(jti)
  redis.call('ZREM', ready, jti)
  redis.call('ZREM', leased, jti)
  redis.call('HDEL', jwss, jti)
end

-- Acks: unknown, foreign (another client's keys are never touched) or repeated jtis are no-ops.
local acked = 0
local a = tonumber(ARGV[4])
local at = 5
for i = at, at + a - 1 do
  if redis.call('ZREM', all, ARGV[i]) == 1 then
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
  if redis.call('ZREM', all, jti) == 1 then
    local jws = redis.call('HGET', jwss, jti) or ''
    forget(jti)
    -- The error object is built (and escaped) by the caller; the JWS needs no escaping.
    redis.call('HSET', nacks, jti, '{"set":"' .. jws .. '",' .. string.sub(ARGV[at + 2 * i + 1], 2))
    nacked = nacked + 1
  end
end
if nacked > 0 then redis.call('PEXPIRE', nacks, tonumber(ARGV[3])) end

-- Leases that ended: those SETs are deliverable again, in their original order.
local now_s = string.format('%.0f', now)
local back = redis.call('ZRANGEBYSCORE', leased, '-inf', now_s)
for _, jti in ipairs(back) do
  local score = redis.call('ZSCORE', all, jti)
  if score then redis.call('ZADD', ready, score, jti) end
end
if #back > 0 then redis.call('ZREMRANGEBYSCORE', leased, '-inf', now_s) end

-- Retention: unacked SETs published before the cutoff are dropped and counted.
local cutoff = string.format('%.0f', (now - tonumber(ARGV[3])) * 1000)
local expired = 0
while true do
  local old = redis.call('ZRANGEBYSCORE', all, '-inf', '(' .. cutoff, 'LIMIT', 0, 500)
  if #old == 0 then break end
  redis.call('ZREM', all, unpack(old))
  redis.call('ZREM', ready, unpack(old))
  redis.call('ZREM', leased, unpack(old))
  redis.call('HDEL', jwss, unpack(old))
  expired = expired + #old
end

-- Selection: oldest first. HMGET/ZREM go in chunks: Lua's unpack() is limited to ~8000 values.
local out = {}
local picked = 0
if limit > 0 then
  local ids = redis.call('ZRANGE', ready, 0, limit - 1)
  local until_ms = string.format('%.0f', now + lease)
  for from = 1, #ids, 500 do
    local chunk = {}
    for i = from, math.min(from + 499, #ids) do chunk[#chunk + 1] = ids[i] end
    local bodies = redis.call('HMGET', jwss, unpack(chunk))
    for i, jti in ipairs(chunk) do
      if bodies[i] then
        out[#out + 1] = jti
        out[#out + 1] = bodies[i]
        picked = picked + 1
        if lease > 0 then redis.call('ZADD', leased, until_ms, jti) end
      else
        -- A jti without its JWS cannot be delivered; drop it rather than return it forever.
        redis.call('ZREM', all, jti)
        redis.call('ZREM', ready, jti)
      end
    end
    if lease > 0 then redis.call('ZREM', ready, unpack(chunk)) end
  end
end

local left = redis.call('ZCARD', ready)
if lease == 0 then left = left - picked end
local more = 0
if left > 0 then more = 1 end
local next_ms = -1
local first = redis.call('ZRANGE', leased, 0, 0, 'WITHSCORES')
if #first > 0 then next_ms = math.max(0, tonumber(first[2]) - now) end
return {acked, nacked, expired, more, next_ms, out}
