-- Create the event subscription of one OB client; OB allows one per TPP.
-- KEYS[1] subscription hash
-- ARGV[1] id, ARGV[2] version, ARGV[3] callback URL ('' for none), ARGV[4] types, ARGV[5] created
-- Returns 1 when created, 0 when the client already has one (the caller answers 409).
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'version', ARGV[2], 'types', ARGV[4],
  'created', ARGV[5])
if ARGV[3] ~= '' then redis.call('HSET', KEYS[1], 'callback', ARGV[3]) end
return 1
