-- Recount the tenants' places and the ledger of admitted interactive runs from the run records,
-- in one step, so that no admission or run's end can come between the count and the correction
-- (fleet.scheduling.recount.Recount).
-- A tenant's places of a class = its runs not ended (the active index) + its runs with a compact
-- record (the backlog's count, changed with the records) + the places of admissions on their way
-- (claims not yet settled, and younger than the grace). A claim past its grace, or settled, is
-- dropped. The ledger keeps the interactive runs not ended (and those of admissions on their way)
-- and gets back those it lost.
-- The run hashes are read by the key prefix given (one Redis, or the primary behind Sentinels).
-- KEYS: tenants' active counts, active index, backlog runs per tenant, claims, admitted runs,
-- their llm steps, the waits of parked runs.
-- ARGV: run key prefix, now, claims' grace (s), then agent name and llm steps per agent.
-- Returns {field, old count, new count, ...} for each count that changed, then the ledger's
-- entries dropped and added: {..., 'ledger', dropped, added}.
--!include active_field.lua
local prefix, now, grace = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local steps_of = {}
for i = 4, #ARGV, 2 do steps_of[ARGV[i]] = tonumber(ARGV[i + 1]) end
local counts, live, on_its_way = {}, {}, {}
local function add(field, n) counts[field] = (counts[field] or 0) + n end
for _, id in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
  local v = redis.call('HMGET', prefix .. id, 'status', 'tenant', 'priority', 'deadline_at', 'agent')
  if v[1] and not TERMINAL[v[1]] then
    add(active_field(v[2], v[3]), 1)
    if v[3] == 'interactive' then live[id] = v end
  end
end
-- Parked runs (out of the active index, in the waits) keep their places, and no entry in the
-- ledger: they take no interactive capacity (fleet.run.waits).
for _, id in ipairs(redis.call('ZRANGE', KEYS[7], 0, -1)) do
  local v = redis.call('HMGET', prefix .. id, 'status', 'tenant', 'priority')
  if v[1] == 'waiting' then add(active_field(v[2], v[3]), 1) end
end
local backlog = redis.call('HGETALL', KEYS[3])
for i = 1, #backlog, 2 do
  local n = tonumber(backlog[i + 1])
  if n > 0 then add(active_field(backlog[i], 'batch'), n) end
end
local claims = redis.call('HGETALL', KEYS[4])
for i = 1, #claims, 2 do
  local field, n = claims[i], tonumber(claims[i + 1])
  local tenant, priority, token, at = string.match(field, '^(.*)|([^|]*)|([^|]*)|([^|]*)$')
  if n > 0 and at and now - tonumber(at) <= grace then
    add(active_field(tenant, priority), n)
    on_its_way[token] = true
  else
    redis.call('HDEL', KEYS[4], field)
  end
end
local out = {}
local old = redis.call('HGETALL', KEYS[1])
local seen = {}
for i = 1, #old, 2 do
  local field, was = old[i], tonumber(old[i + 1])
  seen[field] = true
  local want = counts[field] or 0
  if was ~= want then
    if want == 0 then redis.call('HDEL', KEYS[1], field) else redis.call('HSET', KEYS[1], field, want) end
    table.insert(out, field); table.insert(out, was); table.insert(out, want)
  end
end
for field, want in pairs(counts) do
  if not seen[field] and want ~= 0 then
    redis.call('HSET', KEYS[1], field, want)
    table.insert(out, field); table.insert(out, 0); table.insert(out, want)
  end
end
local dropped, added = 0, 0
for _, id in ipairs(redis.call('ZRANGE', KEYS[5], 0, -1)) do
  if not live[id] and not on_its_way[id] then
    redis.call('ZREM', KEYS[5], id)
    redis.call('HDEL', KEYS[6], id)
    dropped = dropped + 1
  end
end
for id, v in pairs(live) do
  local deadline = tonumber(v[4])
  if deadline and deadline > now and not redis.call('ZSCORE', KEYS[5], id) then
    redis.call('ZADD', KEYS[5], deadline, id)
    redis.call('HSET', KEYS[6], id, steps_of[v[5]] or 1)
    added = added + 1
  end
end
table.insert(out, 'ledger'); table.insert(out, dropped); table.insert(out, added)
return out
