-- Give a slot back and tell waiting requests (fleet.inference.slots.Slots.release).
-- KEYS[1] the lease's sorted set; ARGV: member, slot channel, replica name.
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
  redis.call('PUBLISH', ARGV[2], ARGV[3])
  return 1
end
return 0
