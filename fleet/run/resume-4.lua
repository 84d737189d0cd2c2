-- Deliver a signal to a run, or time out its wait (fleet.run.store.RunStore.signal and
-- .time_out). A signal's payload is kept in the run hash whatever the run does (a wait that
-- starts later finds it); a run parked on it resumes: its wait step commits with the payload,
-- it is running again and back in the index of runs in progress, out of the waits.
-- A timeout (ARGV[1] empty) resumes a run whose wait is due with the output '{"timed_out":true}'.
-- KEYS: run hash, events stream, active index, waits.
-- ARGV: signal name ('' for a timeout), payload JSON, run id, events maxlen, the wait step's
-- record JSON, runs index base, now.
-- Returns 1 when the run resumed (the caller sends its next step), 0 when the signal was only
-- kept (or the wait is not due), -2 when the run ended, -1 without a run.
--!include run_index.lua
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return -1 end
if ARGV[1] ~= '' then
  redis.call('HSET', KEYS[1], 'signal:' .. ARGV[1], ARGV[2])
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'type', 'signal', 'name', ARGV[1])
end
if TERMINAL[status] then
  redis.call('ZREM', KEYS[4], ARGV[3])
  return -2
end
if status ~= 'waiting' then return 0 end
local w = redis.call('HMGET', KEYS[1], 'waiting_for', 'wait_until', 'waiting_step')
if ARGV[1] ~= '' and w[1] ~= ARGV[1] then return 0 end
if ARGV[1] == '' and tonumber(w[2] or '0') > tonumber(ARGV[7]) then return 0 end
local out = ARGV[2]
if ARGV[1] == '' then out = '{"timed_out":true}' end
redis.call('HSET', KEYS[1], 'out:' .. w[3], out, 'step:' .. w[3], ARGV[5], 'status', 'running')
redis.call('HDEL', KEYS[1], 'waiting_for', 'wait_until', 'waiting_step')
index_move(ARGV[6], ARGV[3], KEYS[1], 'waiting', 'running')
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'type', 'step', 'step', w[3], 'status', 'done')
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'type', 'status', 'status', 'running')
redis.call('ZREM', KEYS[4], ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[7], ARGV[3])
return 1
