-- Commit a step once, with its "done" event (fleet.run.store.RunStore.finish_step): a second
-- commit of the same step (a redelivered message) is refused.
-- KEYS: run hash, events stream, active index.
-- ARGV: step key, output JSON, step record JSON, duration, events maxlen, now, run id.
-- Returns 1 when committed, 0 when the step was already committed, -1 without a run.
local rec = redis.call('HGET', KEYS[1], 'step:' .. ARGV[1])
if rec then
  local st = cjson.decode(rec)['status']
  if st == 'done' or st == 'skipped' then return 0 end
end
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
redis.call('HSET', KEYS[1], 'out:' .. ARGV[1], ARGV[2], 'step:' .. ARGV[1], ARGV[3])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*',
           'type', 'step', 'step', ARGV[1], 'status', 'done', 'duration_s', ARGV[4])
redis.call('ZADD', KEYS[3], 'XX', ARGV[6], ARGV[7])
return 1
