-- Drop a run whose record is gone (expired) from the runs index (fleet.run.index.RunIndex.trim);
-- a run whose record exists (made again by a replay meanwhile) is left alone.
-- KEYS: run hash, its set by tenant, class and agent, the set of ids, then its tenant's status
-- sets (every status but succeeded).
-- ARGV: run id. Returns 1 when dropped.
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
for i = 2, #KEYS do redis.call('ZREM', KEYS[i], ARGV[1]) end
return 1
