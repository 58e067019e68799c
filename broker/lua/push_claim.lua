-- Claim the pushes that fell due, for one worker: each is pushed forward by a lease, so
-- another worker (or this one after a crash) takes it again only once the lease is over.
-- At most ARGV[4] pushes per TPP may be in flight in this worker: a TPP's endpoint that hangs
-- then holds a few of the worker's slots, not all of them, and the other TPPs' pushes go on.
-- Members of a TPP at its cap are passed over and stay due, untouched.
-- KEYS[1] schedule (zset); ARGV[1] now (ms), ARGV[2] lease (ms), ARGV[3] most to claim,
-- ARGV[4] cap per TPP, ARGV[5] most members to look at, then pairs (client id, pushes of
-- it in flight in this worker).
-- Returns the members claimed ("<client id>\n<jti>").
local now, room, cap, budget = ARGV[1], tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local busy = {}
for i = 6, #ARGV, 2 do busy[ARGV[i]] = tonumber(ARGV[i + 1]) end
local claimed = {}
local offset = 0
while #claimed < room and offset < budget do
  local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', offset, room)
  if #due == 0 then break end
  offset = offset + #due
  for _, member in ipairs(due) do
    local client = string.match(member, '^(.*)\n')
    local n = busy[client] or 0
    if n < cap then
      busy[client] = n + 1
      claimed[#claimed + 1] = member
      if #claimed == room then break end
    end
  end
end
-- Leased after the scan: a lease moves a member out of the due range, which would shift the
-- offsets of the pages still to read.
local until_ms = tonumber(now) + tonumber(ARGV[2])
for _, member in ipairs(claimed) do
  redis.call('ZADD', KEYS[1], until_ms, member)
end
return claimed
