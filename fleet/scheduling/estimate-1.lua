-- Fold one ended run's model seconds into the estimate. KEYS: estimate hash.
-- ARGV: the run's model seconds, alpha, the default.
-- (fleet.scheduling.backlog.Backlog.record_run)
local old = tonumber(redis.call('HGET', KEYS[1], 'run_model_s') or ARGV[3])
local new = old + tonumber(ARGV[2]) * (tonumber(ARGV[1]) - old)
redis.call('HSET', KEYS[1], 'run_model_s', tostring(new))
return tostring(new)
