-- Undo a poll whose answer never reached the client: put the cursor back, but only if no
-- later poll has moved it since (compare-and-set).
-- KEYS[1] queue meta hash; ARGV[1] cursor the poll set, ARGV[2] cursor before that poll
if redis.call('HGET', KEYS[1], 'cursor') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'cursor', ARGV[2])
  return 1
end
return 0
