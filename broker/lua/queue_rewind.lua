-- Undo a poll whose answer never reached the client: put the cursor back, but only if no
-- later poll has moved it since. Polls number their cursor moves (gen), so a rewind that
-- comes late, after the events were handed out again, is refused rather than repeated.
-- KEYS[1] queue meta hash; ARGV[1] generation of the poll to undo, ARGV[2] cursor before it
if redis.call('HGET', KEYS[1], 'gen') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'cursor', ARGV[2])
  redis.call('HINCRBY', KEYS[1], 'gen', 1)
  return 1
end
return 0
