-- Take a slot on the healthy replica with the most room (fleet.inference.slots.Slots.try_acquire).
-- KEYS: [1] interactive waiters, [2] batch waiters, then per replica i (b = 2 + 5 * (i - 1)):
--   [b+1] state hash, [b+2] interactive leases, [b+3] batch leases, [b+4] interactive demand,
--   [b+5] interactive requests not started yet.
-- ARGV: [1] now, [2] member, [3] class, [4] stale before, [5] policy, [6] static batch cap,
--   [7] waiter token, [8] preempt channel, [9] first replica to look at (rotation),
--   [10] reserve floor, [11] demand window (s), [12] batch requests an interactive one preempts,
--   [13] interactive requests not yet started at a replica that keep batch from it.
-- Returns {i, victim} (victim: '' or the member whose slot it took), or {0, 'down' | 'full'}.
local now, member, class = tonumber(ARGV[1]), ARGV[2], ARGV[3]
local stale, policy = tonumber(ARGV[4]), ARGV[5]
local n = (#KEYS - 2) / 5
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if class == 'batch' and redis.call('ZCARD', KEYS[1]) > 0 then
  -- an interactive request waits for a slot: batch takes none before it
  redis.call('ZADD', KEYS[2], now + 2, ARGV[7])
  return {0, 'full'}
end
local best, best_free, up = 0, -1e9, 0
local load = {}
for j = 0, n - 1 do
  local i = (tonumber(ARGV[9]) + j) % n + 1
  local b = 2 + 5 * (i - 1)
  local st = redis.call('HMGET', KEYS[b + 1], 'state', 'capacity', 'pipeline')
  if st[1] == 'up' and st[2] then
    up = up + 1
    redis.call('ZREMRANGEBYSCORE', KEYS[b + 2], '-inf', stale)
    redis.call('ZREMRANGEBYSCORE', KEYS[b + 3], '-inf', stale)
    local ni, nb = redis.call('ZCARD', KEYS[b + 2]), redis.call('ZCARD', KEYS[b + 3])
    local cap, pipe = tonumber(st[2]), tonumber(st[3] or '0')
    load[i] = {ni, nb}
    local free
    if policy == 'preempt' then
      free = cap + pipe - ni - nb
      if class == 'batch' then
        redis.call('ZREMRANGEBYSCORE', KEYS[b + 5], '-inf', now)
        if redis.call('ZCARD', KEYS[b + 5]) >= tonumber(ARGV[13]) then free = -1e9 end
      end
    elseif class == 'interactive' then
      free = cap - ni - nb  -- never waits: the most room, or the least over
    elseif policy == 'static' then
      free = tonumber(ARGV[6]) - nb
    else
      redis.call('ZREMRANGEBYSCORE', KEYS[b + 4], '-inf', now - tonumber(ARGV[11]))
      local reserve = math.max(tonumber(ARGV[10]), ni)
      for _, sample in ipairs(redis.call('ZRANGE', KEYS[b + 4], 0, -1)) do
        local seen = tonumber(string.match(sample, '^(%d+):'))
        if seen and seen > reserve then reserve = seen end
      end
      free = cap - reserve - nb
    end
    if free > best_free then best, best_free = i, free end
  end
end
if up == 0 then return {0, 'down'} end
local victim = ''
if class == 'interactive' and policy == 'preempt' then
  if best_free <= 0 then
    -- no room anywhere: the youngest preemptible batch request in the pool gives up its slot
    local young = -1
    for i, _ in pairs(load) do
      local b = 2 + 5 * (i - 1)
      for _, m in ipairs(redis.call('ZRANGE', KEYS[b + 3], 0, -1)) do
        local t = tonumber(string.match(m, '^(%d+):'))
        if t and t > young then young, best = t, i end
      end
    end
    if young < 0 then
      redis.call('ZADD', KEYS[1], now + 2, ARGV[7])
      return {0, 'full'}
    end
  end
  -- Requests sent beyond the replica's capacity reach its first-come-first-served queue
  -- ahead of this one; about `pipeline` of them find a sequence freed while this one is on
  -- its way in. The youngest batch ones go, so that at most pipeline - ARGV[12] stay ahead
  -- (at least one when there is no room, none beyond what is over capacity when there is).
  local b = 2 + 5 * (best - 1)
  local st = redis.call('HMGET', KEYS[b + 1], 'capacity', 'pipeline')
  local most = tonumber(ARGV[12])
  local beyond = load[best][1] + load[best][2] - tonumber(st[1])
  local want = math.min(most, 1 + math.max(0, beyond), math.max(0, beyond - tonumber(st[2] or '0') + most))
  if best_free > 0 then want = math.min(want, math.max(0, beyond)) end
  if want > 0 then
    local batch = {}
    for _, m in ipairs(redis.call('ZRANGE', KEYS[b + 3], 0, -1)) do
      local t = tonumber(string.match(m, '^(%d+):'))
      if t then table.insert(batch, {t, m}) end
    end
    table.sort(batch, function(x, y) return x[1] > y[1] end)
    for k = 1, math.min(#batch, want) do
      local m = batch[k][2]
      if victim == '' then victim = m end
      redis.call('ZREM', KEYS[b + 3], m)
      redis.call('HINCRBY', KEYS[b + 1], 'preempted', 1)
      redis.call('PUBLISH', ARGV[8], string.match(m, ':(%x+)$'))
      load[best][2] = load[best][2] - 1
    end
  end
elseif best_free <= 0 and class == 'batch' then
  redis.call('ZADD', KEYS[2], now + 2, ARGV[7])
  return {0, 'full'}
end
local b = 2 + 5 * (best - 1)
redis.call('ZREM', class == 'interactive' and KEYS[1] or KEYS[2], ARGV[7])
if class == 'interactive' then
  redis.call('ZADD', KEYS[b + 2], now, member)
  if policy == 'preempt' then redis.call('ZADD', KEYS[b + 5], now + 2, ARGV[7]) end
  local ni = load[best][1] + 1
  if policy == 'reserve' then redis.call('ZADD', KEYS[b + 4], now, ni .. ':' .. ARGV[7]) end
  if ni > tonumber(redis.call('HGET', KEYS[b + 1], 'peak_interactive') or '0') then
    redis.call('HSET', KEYS[b + 1], 'peak_interactive', ni)
  end
else
  redis.call('ZADD', KEYS[b + 3], now, member)
  local nb = load[best][2] + 1
  if nb > tonumber(redis.call('HGET', KEYS[b + 1], 'peak_batch') or '0') then
    redis.call('HSET', KEYS[b + 1], 'peak_batch', nb)
  end
end
return {best, victim}
