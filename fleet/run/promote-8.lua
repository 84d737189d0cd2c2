-- Turn a backlog run's compact record into its run hash, once (fleet.run.store.RunStore.promote):
-- with its status event, in the runs index (a backlog run is indexed from here on), in the
-- active index unless the status is terminal (a run ended in the backlog), out of the
-- dispatching set; a terminal one gives its tenant's place back (fleet.scheduling.quotas).
-- The tenant's count of compact records goes down in the same step.
-- Returns 0 when the compact record is gone (dispatched or ended).
-- KEYS: compact record, run hash, events stream, active index, dispatching set, dispatched hash,
-- tenants' active counts, backlog runs per tenant.
-- ARGV: run id, status, TTL, events maxlen, now, runs index base, n = number of field/value
-- pairs, the pairs, then the event's extra pairs.
--!include active_field.lua
--!include run_index.lua
if redis.call('DEL', KEYS[1]) == 0 then return 0 end
local n = tonumber(ARGV[7])
local fields = {}
for i = 8, 7 + 2 * n do table.insert(fields, ARGV[i]) end
redis.call('HSET', KEYS[2], unpack(fields))
redis.call('HINCRBY', KEYS[8], redis.call('HGET', KEYS[2], 'tenant') or 'default', -1)
local event = {'type', 'status', 'status', ARGV[2]}
for i = 8 + 2 * n, #ARGV do table.insert(event, ARGV[i]) end
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', unpack(event))
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('EXPIRE', KEYS[3], ARGV[3])
redis.call('ZREM', KEYS[5], ARGV[1])
local run = redis.call('HMGET', KEYS[2], 'tenant', 'priority', 'agent', 'created_at')
index_add(ARGV[6], ARGV[1], run[4], run[1], run[2], run[3], ARGV[2])
if TERMINAL[ARGV[2]] then
  redis.call('HDEL', KEYS[6], ARGV[1])
  redis.call('HINCRBY', KEYS[7], active_field(run[1], run[2]), -1)
else
  redis.call('ZADD', KEYS[4], ARGV[5], ARGV[1])
end
return 1
