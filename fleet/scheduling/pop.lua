-- Pop up to n runs, each from the backlogged tenant with the smallest effective time.
-- KEYS: backlogged set, virtual times, dispatched hash, dispatching set, backlog size, clock,
-- then one backlog per candidate tenant.
-- ARGV: now, n, estimate (model seconds of a run), then name and weight per candidate.
-- Returns run id, tenant, run id, tenant, ...
-- (fleet.scheduling.backlog.Backlog.pop)
local n = tonumber(ARGV[2])
local e = tonumber(ARGV[3])
local inflight = {}
for _, t in ipairs(redis.call('HVALS', KEYS[3])) do inflight[t] = (inflight[t] or 0) + 1 end
local tenants = {}
for i = 7, #KEYS do
  local name = ARGV[4 + 2 * (i - 7)]
  local w = tonumber(ARGV[5 + 2 * (i - 7)])
  if redis.call('SISMEMBER', KEYS[1], name) == 1 then
    local v = tonumber(redis.call('ZSCORE', KEYS[2], name) or '0')
    table.insert(tenants, {name = name, w = w, key = KEYS[i], v = v, eff = v + (inflight[name] or 0) * e / w})
  end
end
local out = {}
while #out < 2 * n and #tenants > 0 do
  local best = 1
  for i = 2, #tenants do
    if tenants[i].eff < tenants[best].eff then best = i end
  end
  local t = tenants[best]
  local id = redis.call('LPOP', t.key)
  if id then
    redis.call('DECR', KEYS[5])
    redis.call('HSET', KEYS[3], id, t.name)
    redis.call('ZADD', KEYS[4], ARGV[1], id)
    redis.call('SET', KEYS[6], tostring(t.v))
    table.insert(out, id)
    table.insert(out, t.name)
    t.eff = t.eff + e / t.w
  end
  if redis.call('LLEN', t.key) == 0 then
    redis.call('SREM', KEYS[1], t.name)
    table.remove(tenants, best)
  end
end
return out
