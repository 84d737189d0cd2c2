-- Take a fleet-wide lock, or keep it when this worker holds it (fleet.core.loops.Leadership).
-- KEYS[1] the lock. ARGV: owner, lifetime (ms). Returns 1 when the caller holds it now.
local holder = redis.call('GET', KEYS[1])
if holder == false then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
if holder == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
