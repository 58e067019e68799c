-- Replace the fields of an OB client's event subscription, if `id` names it.
-- KEYS[1] subscription hash
-- ARGV[1] id, ARGV[2] version, ARGV[3] callback URL ('' for none), ARGV[4] types
-- Returns 1 when updated, 0 when the client has no subscription with that id.
if redis.call('HGET', KEYS[1], 'id') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'version', ARGV[2], 'types', ARGV[4])
if ARGV[3] ~= '' then
  redis.call('HSET', KEYS[1], 'callback', ARGV[3])
else
  redis.call('HDEL', KEYS[1], 'callback')
end
return 1
