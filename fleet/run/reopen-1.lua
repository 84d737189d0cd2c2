-- Reopen a finished run for a replay (fleet.run.store.RunStore.reopen), and move it from its
-- ending's set of the runs index to the queued runs'.
-- KEYS[1] run hash. ARGV[1] = runs index base, ARGV[2] = run id, ARGV[3] = number of fields to
-- delete, then those fields, then field/value pairs to set (status among them).
-- Returns 1 when reopened, 0 when it had not ended, -1 without a run.
--!include run_index.lua
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return -1 end
if status == 'queued' or status == 'running' then return 0 end
local n = tonumber(ARGV[3])
for i = 4, n + 3 do redis.call('HDEL', KEYS[1], ARGV[i]) end
for i = n + 4, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
index_move(ARGV[1], ARGV[2], KEYS[1], status, redis.call('HGET', KEYS[1], 'status'))
return 1
