-- Reopen a finished run for a replay (fleet.run.store.RunStore.reopen).
-- KEYS[1] run hash. ARGV[1] = number of fields to delete, then those fields, then field/value
-- pairs to set. Returns 1 when reopened, 0 when it had not ended, -1 without a run.
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return -1 end
if status == 'queued' or status == 'running' then return 0 end
local n = tonumber(ARGV[1])
for i = 2, n + 1 do redis.call('HDEL', KEYS[1], ARGV[i]) end
for i = n + 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
return 1
