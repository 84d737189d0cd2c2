-- Append run ids to a tenant's backlog; a tenant that was not backlogged starts at the
-- smallest virtual time of those that are (the clock when none is).
-- KEYS: the tenant's backlog, backlogged set, virtual times, backlog size, clock.
-- ARGV: tenant, then run ids.
-- (fleet.scheduling.backlog.Backlog.queue_push)
local ids = {}
for i = 2, #ARGV do table.insert(ids, ARGV[i]) end
redis.call('RPUSH', KEYS[1], unpack(ids))
redis.call('INCRBY', KEYS[4], #ids)
if redis.call('SADD', KEYS[2], ARGV[1]) == 1 then
  local low = nil
  for _, t in ipairs(redis.call('SMEMBERS', KEYS[2])) do
    if t ~= ARGV[1] then
      local v = tonumber(redis.call('ZSCORE', KEYS[3], t) or '0')
      if low == nil or v < low then low = v end
    end
  end
  if low == nil then low = tonumber(redis.call('GET', KEYS[5]) or '0') end
  redis.call('ZADD', KEYS[3], 'GT', low, ARGV[1])
end
return #ids
