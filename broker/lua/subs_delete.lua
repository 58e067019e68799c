-- Delete an OB client's event subscription, if `id` names it. SETs already queued stay
-- pollable until acked or past the retention; no new SET is queued without a subscription.
-- KEYS[1] subscription hash; ARGV[1] id
-- Returns 1 when deleted, 0 when the client has no subscription with that id.
if redis.call('HGET', KEYS[1], 'id') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
