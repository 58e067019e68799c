-- Undo a poll whose answer never reached the client: put the cursor back to where that poll
-- found it, but only if it is still the queue's latest poll. The token is cleared, so a rewind
-- that comes twice, or after a later poll, changes nothing.
-- KEYS[1] queue meta hash; ARGV[1] token of the poll to undo
local meta = redis.call('HMGET', KEYS[1], 'ptok', 'pprev')
if meta[1] == ARGV[1] then
  redis.call('HSET', KEYS[1], 'cursor', meta[2], 'ptok', '')
  return 1
end
return 0
