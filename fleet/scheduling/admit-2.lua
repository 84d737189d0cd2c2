-- Admit an interactive run unless the model steps ahead of it leave it no time to finish by its
-- deadline, in one call (fleet.scheduling.admitted.AdmittedRuns); or, in forecast mode, only say
-- what a run would wait. The wait formula lives here alone:
--   wait = floor(ahead / parallel) * step + (handoff if ahead % parallel >= ready)
-- the steps ahead are served `parallel` at a time, about `step` seconds each (the recent p99),
-- and a run whose place in a wave falls on a thread of a shared worker busy with a batch step
-- also waits `handoff` for it.
-- KEYS: the class's admitted runs (sorted set, scored by deadline), their llm steps (hash).
-- ARGV: now, run id, its llm steps, its deadline (absolute), parallel, step time (s; 0 admits
-- without a prediction), the new run's time (s), its deadline (s from now), ready threads,
-- handoff (s), mode ('admit' or 'forecast'), steps ahead (-1: those of the admitted runs).
-- Returns {admitted (0/1), steps ahead, predicted wait (s, as text; '' without a step time)}.
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if #gone > 0 then
  redis.call('HDEL', KEYS[2], unpack(gone))
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
end
local ahead = tonumber(ARGV[12])
if ahead < 0 then
  ahead = 0
  local ids = redis.call('ZRANGE', KEYS[1], 0, -1)
  if #ids > 0 then
    for _, n in ipairs(redis.call('HMGET', KEYS[2], unpack(ids))) do ahead = ahead + (tonumber(n) or 1) end
  end
end
local step, parallel = tonumber(ARGV[6]), math.max(1, tonumber(ARGV[5]))
local wait = ''
local fits = true
if step > 0 then
  local w = math.floor(ahead / parallel) * step
  if ahead % parallel >= tonumber(ARGV[9]) then w = w + tonumber(ARGV[10]) end
  wait = tostring(w)
  fits = w + tonumber(ARGV[7]) <= tonumber(ARGV[8])
end
if ARGV[11] ~= 'admit' or not fits then return {0, ahead, wait} end
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
return {1, ahead, wait}
