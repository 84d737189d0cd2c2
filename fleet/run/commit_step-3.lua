-- Commit a step once, with its "done" event (fleet.run.store.RunStore.finish_step): a second
-- commit of the same step (a redelivered message) is refused.
-- A branch of a parallel step (ARGV[8] names the step) also counts itself in the run hash's
-- 'joined:<step>' field; the commit that brings the count to the number of branches (ARGV[9])
-- is the join: in the same step it writes the parallel step's output (the branches' outputs, in
-- branch order, as a list, or as an object by the names in ARGV[11]) and record (ARGV[10]).
-- Counted inside this script, the join happens once however the branches are delivered.
-- KEYS: run hash, events stream, active index.
-- ARGV: step key, output JSON, step record JSON, duration, events maxlen, now, run id, then for
-- a branch: parallel step name, number of branches, the join's record JSON, branch names
-- (comma-separated, '' for a map).
-- Returns 0 when the step was already committed, -1 without a run, else 1 (a branch: the
-- number of branches committed, this one included).
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
if not ARGV[8] or ARGV[8] == '' then return 1 end
local name, total = ARGV[8], tonumber(ARGV[9])
local n = redis.call('HINCRBY', KEYS[1], 'joined:' .. name, 1)
if n == total then
  local names = {}
  for part in string.gmatch(ARGV[11], '[^,]+') do table.insert(names, part) end
  local parts = {}
  for i = 1, total do
    local out = redis.call('HGET', KEYS[1], 'out:' .. name .. '#' .. i) or 'null'
    if #names > 0 then out = cjson.encode(names[i]) .. ':' .. out end
    parts[i] = out
  end
  local joined
  if #names > 0 then joined = '{' .. table.concat(parts, ',') .. '}' else joined = '[' .. table.concat(parts, ',') .. ']' end
  redis.call('HSET', KEYS[1], 'out:' .. name, joined, 'step:' .. name, ARGV[10])
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[5], '*',
             'type', 'step', 'step', name, 'status', 'done', 'duration_s', '0', 'branches', tostring(total))
end
return n
