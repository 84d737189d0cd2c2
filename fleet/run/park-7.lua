-- Park a run at a wait step (fleet.run.store.RunStore.park), unless the signal it waits for
-- already came (a signal is kept from its arrival): then the wait step commits with the
-- signal's payload at once. A parked run leaves the index of runs in progress (the reconciler
-- resends none of its steps: it has no message, by design) and enters the sorted set of waits,
-- scored by its timeout, that the reconciler's loop scans (fleet.run.waits); it leaves the
-- ledger of admitted interactive runs too (fleet.scheduling.admitted): a parked run takes no
-- interactive capacity, and admission predicts no wait for it; and, a batch run, the dispatched
-- backlog runs (fleet.scheduling.dispatch): it holds no place in the dispatch window.
-- KEYS: run hash, events stream, active index, waits, admitted interactive runs, their steps,
-- dispatched backlog runs.
-- ARGV: wait step, signal name, timeout at, run id, events maxlen, the step's record JSON when
-- it commits at once, runs index base, its record JSON while it waits.
-- Returns 1 when parked, 2 when the step committed (the signal was there, or it was done),
-- 0 when the run ended, -1 without a run.
--!include run_index.lua
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return -1 end
if TERMINAL[status] then return 0 end
local rec = redis.call('HGET', KEYS[1], 'step:' .. ARGV[1])
if rec and cjson.decode(rec)['status'] == 'done' then return 2 end
local payload = redis.call('HGET', KEYS[1], 'signal:' .. ARGV[2])
if payload then
  redis.call('HSET', KEYS[1], 'out:' .. ARGV[1], payload, 'step:' .. ARGV[1], ARGV[6])
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'type', 'step', 'step', ARGV[1], 'status', 'done',
             'signal', ARGV[2])
  return 2
end
redis.call('HSET', KEYS[1], 'status', 'waiting', 'waiting_for', ARGV[2], 'wait_until', ARGV[3],
           'waiting_step', ARGV[1], 'step:' .. ARGV[1], ARGV[8])
index_move(ARGV[7], ARGV[4], KEYS[1], status, 'waiting')
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*', 'type', 'status', 'status', 'waiting',
           'waiting_for', ARGV[2], 'wait_until', ARGV[3])
redis.call('ZREM', KEYS[3], ARGV[4])
redis.call('ZADD', KEYS[4], ARGV[3], ARGV[4])
redis.call('ZREM', KEYS[5], ARGV[4])
redis.call('HDEL', KEYS[6], ARGV[4])
redis.call('HDEL', KEYS[7], ARGV[4])
return 1
