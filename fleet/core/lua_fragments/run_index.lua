-- The runs index (fleet.run.index): key names built from its base as fleet.keys.Keys builds
-- them, and the writes that keep it in step with a run's record. A run is in the set of its
-- tenant, class and agent, in the set of its status (every status but 'succeeded', the common
-- outcome, which a listing finds by reading the rows), and in the set of ids; sorted sets are
-- scored by the run's creation time.
local function index_status_key(base, tenant, status)
  return base .. 'status:' .. (tenant or 'default') .. '|' .. status
end

local function index_add(base, id, score, tenant, priority, agent, status)
  local facet = (tenant or 'default') .. '|' .. (priority or 'batch') .. '|' .. agent
  redis.call('ZADD', base .. 'by:' .. facet, score, id)
  redis.call('SADD', base .. 'facets', facet)
  redis.call('ZADD', base .. 'ids', 0, id)
  if status ~= 'succeeded' then redis.call('ZADD', index_status_key(base, tenant, status), score, id) end
end

-- Move a run (its hash at run_key) from the set of status old to the set of status new.
local function index_move(base, id, run_key, old, new)
  if old == new then return end
  local f = redis.call('HMGET', run_key, 'tenant', 'created_at')
  if old and old ~= 'succeeded' then redis.call('ZREM', index_status_key(base, f[1], old), id) end
  if new ~= 'succeeded' and f[2] then redis.call('ZADD', index_status_key(base, f[1], new), f[2], id) end
end
