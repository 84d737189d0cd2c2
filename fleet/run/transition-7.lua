-- Move a run to a status unless it already ended, with its status event
-- (fleet.run.store.RunStore.transition), and from its old status's set of the runs index to its
-- new one's. A terminal status also sets the record's TTL, drops the run from the active index,
-- from admission's ledger of admitted interactive runs (fleet.scheduling.admitted) and from the
-- dispatched backlog runs, and gives its tenant's place back (fleet.scheduling.quotas), in the
-- same step.
-- KEYS: run hash, events stream, active index, admitted runs, their steps, dispatched backlog
-- runs, tenants' active counts.
-- ARGV: status, run id, TTL (0: not terminal), events maxlen, runs index base, n = number of
-- field/value pairs, the pairs, then the event's extra pairs.
-- Returns 1 when moved, 0 when the run had already ended, -1 without a run hash.
--!include active_field.lua
--!include run_index.lua
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return -1 end
if TERMINAL[status] then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[1])
index_move(ARGV[5], ARGV[2], KEYS[1], status, ARGV[1])
local n = tonumber(ARGV[6])
for i = 7, 6 + 2 * n, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
local event = {'type', 'status', 'status', ARGV[1]}
for i = 7 + 2 * n, #ARGV do table.insert(event, ARGV[i]) end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', unpack(event))
local ttl = tonumber(ARGV[3])
if ttl > 0 then
  redis.call('EXPIRE', KEYS[1], ttl)
  redis.call('EXPIRE', KEYS[2], ttl)
  redis.call('ZREM', KEYS[3], ARGV[2])
  redis.call('ZREM', KEYS[4], ARGV[2])
  redis.call('HDEL', KEYS[5], ARGV[2])
  redis.call('HDEL', KEYS[6], ARGV[2])
  local owner = redis.call('HMGET', KEYS[1], 'tenant', 'priority')
  redis.call('HINCRBY', KEYS[7], active_field(owner[1], owner[2]), -1)
end
return 1
