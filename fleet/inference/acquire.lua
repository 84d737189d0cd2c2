-- Take a slot on a healthy replica with room, chosen by the routing mode
-- (fleet.inference.slots.Slots.try_acquire; fleet.inference.routing).
-- KEYS: [1] interactive waiters, [2] batch waiters, [3] round-robin turn, then per replica i
--   (b = 3 + 7 * (i - 1)): [b+1] state hash, [b+2] interactive leases, [b+3] batch leases,
--   [b+4] interactive demand, [b+5] interactive requests not started yet, [b+6] prefix index,
--   [b+7] batch calls waiting for this replica (their prefix is cached there).
-- ARGV: [1] now, [2] member, [3] class, [4] stale before, [5] policy, [6] static batch cap,
--   [7] waiter token, [8] preempt channel, [9] first replica to look at (rotation),
--   [10] reserve floor, [11] demand window (s), [12] batch requests an interactive one preempts,
--   [13] interactive requests not yet started at a replica that keep batch from it,
--   [14] routing mode, [15] load bound, [16] cache weight, [17] affinity,
--   [18] index size when the engine reports none, [19] 1 while a batch call may still wait for
--   the replica holding its prefix, [20..] the prompt's block hashes.
-- Returns {i, victim, reason, hit blocks} (victim: '' or the member whose slot it took), or
--   {0, 'down' | 'full'}, or {0, 'wait', home, free at}: it left the free slot to other waiters,
--   to wait for its own.
local now, member, class = tonumber(ARGV[1]), ARGV[2], ARGV[3]
local stale, policy, mode = tonumber(ARGV[4]), ARGV[5], ARGV[14]
local n = (#KEYS - 3) / 7
local nblocks = #ARGV - 19
local function base(i) return 3 + 7 * (i - 1) end

redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if class == 'batch' and redis.call('ZCARD', KEYS[1]) > 0 then
  -- an interactive request waits for a slot: batch takes none before it
  redis.call('ZADD', KEYS[2], now + 2, ARGV[7])
  return {0, 'full'}
end

-- Leading blocks of the prompt in a replica's index (the index keeps a prompt's prefix at
-- least as long as its tail, so presence falls with depth: a binary search finds the edge).
local function cached(key)
  local lo, hi = 0, nblocks
  while lo < hi do
    local mid = math.floor((lo + hi + 1) / 2)
    if redis.call('ZSCORE', key, ARGV[19 + mid]) then lo = mid else hi = mid - 1 end
  end
  return lo
end

-- Room of each healthy replica under the batch policy.
local best, best_free, up = 0, -1e9, 0
local load, free, caps, order = {}, {}, {}, {}
local total_load, total_cap = 0, 0
for j = 0, n - 1 do
  local i = (tonumber(ARGV[9]) + j) % n + 1
  local b = base(i)
  local st = redis.call('HMGET', KEYS[b + 1], 'state', 'capacity', 'pipeline', 'batch_limit')
  if st[1] == 'up' and st[2] then
    up = up + 1
    table.insert(order, i)
    redis.call('ZREMRANGEBYSCORE', KEYS[b + 2], '-inf', stale)
    redis.call('ZREMRANGEBYSCORE', KEYS[b + 3], '-inf', stale)
    local ni, nb = redis.call('ZCARD', KEYS[b + 2]), redis.call('ZCARD', KEYS[b + 3])
    local cap, pipe = tonumber(st[2]), tonumber(st[3] or '0')
    load[i], caps[i] = {ni, nb}, cap
    total_load, total_cap = total_load + ni + nb, total_cap + cap
    local room
    if policy == 'preempt' then
      room = cap + pipe - ni - nb
      if class == 'batch' then
        redis.call('ZREMRANGEBYSCORE', KEYS[b + 5], '-inf', now)
        if redis.call('ZCARD', KEYS[b + 5]) >= tonumber(ARGV[13]) then room = -1e9 end
      end
    elseif class == 'interactive' then
      room = cap - ni - nb  -- never waits: the most room, or the least over
    elseif policy == 'static' then
      room = tonumber(ARGV[6]) - nb
    else
      redis.call('ZREMRANGEBYSCORE', KEYS[b + 4], '-inf', now - tonumber(ARGV[11]))
      local reserve = math.max(tonumber(ARGV[10]), ni)
      for _, sample in ipairs(redis.call('ZRANGE', KEYS[b + 4], 0, -1)) do
        local seen = tonumber(string.match(sample, '^(%d+):'))
        if seen and seen > reserve then reserve = seen end
      end
      room = cap - reserve - nb
    end
    -- the pool monitor's occupancy for the latency objectives: batch takes no slot at or above it
    if class == 'batch' and st[4] then room = math.min(room, tonumber(st[4]) - ni - nb) end
    free[i] = room
    if room > best_free then best, best_free = i, room end
  end
end
if up == 0 then return {0, 'down'} end

-- Among the replicas with room, the routing mode's choice (most room stays the fallback).
local reason, hits = 'most_room', {}
for _, i in ipairs(order) do hits[i] = nblocks > 0 and cached(KEYS[base(i) + 6]) or 0 end
if best_free > 0 and mode == 'round_robin' then
  local turn, first = redis.call('INCR', KEYS[3]), 1e9
  for _, i in ipairs(order) do
    local d = (i - 1 - turn) % n
    if free[i] > 0 and d < first then best, first = i, d end
  end
  reason = 'round_robin'
elseif best_free > 0 and (mode == 'cache' or mode == 'session') then
  -- Consistent hashing with bounded loads: a replica takes the call while its requests in flight,
  -- this one counted, stay within the bound times its share (by capacity) of all in flight.
  local bound = tonumber(ARGV[15]) * (total_load + 1) / total_cap
  local score, most_hit, pref = {}, 0, 0
  for _, i in ipairs(order) do
    if mode == 'cache' then
      score[i] = tonumber(ARGV[16]) * hits[i] / math.max(nblocks, 1) - (load[i][1] + load[i][2]) / caps[i]
      most_hit = math.max(most_hit, hits[i])
    else
      score[i] = tonumber(string.sub(redis.sha1hex(ARGV[17] .. '|' .. KEYS[base(i) + 1]), 1, 12), 16)
    end
    if pref == 0 or score[i] > score[pref] then pref = i end
  end
  local within, anywhere = 0, 0
  for _, i in ipairs(order) do
    if free[i] > 0 then
      if anywhere == 0 or score[i] > score[anywhere] then anywhere = i end
      if load[i][1] + load[i][2] + 1 <= math.ceil(bound * caps[i]) and (within == 0 or score[i] > score[within]) then
        within = i
      end
    end
  end
  best = within > 0 and within or anywhere
  if mode == 'cache' then
    reason = most_hit == 0 and 'miss' or (hits[best] == most_hit and 'hit' or 'spill')
  else
    reason = best == pref and 'session' or 'spill'
  end
  -- A batch call whose prefix is cached on a full replica may wait for a slot there, for a while
  -- (ARGV[19]), when it would find much less elsewhere and another waiting batch call would take
  -- the slot it leaves (one that waits for no replica, or for this one), so no slot idles for it.
  if class == 'batch' and mode == 'cache' and ARGV[19] == '1' and most_hit - hits[best] >= math.max(1, nblocks / 10) then
    local takers = redis.call('ZCARD', KEYS[2]) - (redis.call('ZSCORE', KEYS[2], ARGV[7]) and 1 or 0)
    local home = 0
    for _, i in ipairs(order) do
      local waiting = KEYS[base(i) + 7]
      redis.call('ZREMRANGEBYSCORE', waiting, '-inf', now)
      if i ~= best then
        takers = takers - redis.call('ZCARD', waiting) + (redis.call('ZSCORE', waiting, ARGV[7]) and 1 or 0)
      end
      if home == 0 and hits[i] == most_hit and free[i] <= 0 then home = i end
    end
    if takers > 0 and home > 0 then
      for _, i in ipairs(order) do redis.call('ZREM', KEYS[base(i) + 7], ARGV[7]) end
      redis.call('ZADD', KEYS[base(home) + 7], now + 2, ARGV[7])
      redis.call('HINCRBY', KEYS[base(home) + 1], 'route_waited', 1)
      redis.call('ZADD', KEYS[2], now + 2, ARGV[7])
      return {0, 'wait', home, best}
    end
  end
end

-- Under 'cache' routing, the replica whose batch request an interactive one preempts: the one
-- with its prefix (against load), not the pool's youngest request wherever it runs.
local function victim_replica()
  local pick, pick_score = 0, -1e18
  for _, i in ipairs(order) do
    local preemptible = false
    for _, m in ipairs(redis.call('ZRANGE', KEYS[base(i) + 3], 0, -1)) do
      if string.match(m, '^%d+:') then preemptible = true break end
    end
    if preemptible then
      local score = tonumber(ARGV[16]) * hits[i] / math.max(nblocks, 1) - (load[i][1] + load[i][2]) / caps[i]
      if score > pick_score then pick, pick_score = i, score end
    end
  end
  return pick
end

local victim = ''
if class == 'interactive' and policy == 'preempt' then
  if best_free <= 0 then
    -- no room anywhere: the youngest preemptible batch request in the pool (at the replica the
    -- router prefers, under 'cache') gives up its slot
    local young = -1
    local only = (mode == 'cache' and nblocks > 0) and victim_replica() or 0
    for i, _ in pairs(load) do
      if only == 0 or i == only then
        for _, m in ipairs(redis.call('ZRANGE', KEYS[base(i) + 3], 0, -1)) do
          local t = tonumber(string.match(m, '^(%d+):'))
          if t and t > young then young, best = t, i end
        end
      end
    end
    if young < 0 then
      redis.call('ZADD', KEYS[1], now + 2, ARGV[7])
      return {0, 'full'}
    end
    reason = 'preempt'
  end
  -- Requests sent beyond the replica's capacity reach its first-come-first-served queue
  -- ahead of this one; about `pipeline` of them find a sequence freed while this one is on
  -- its way in. The youngest batch ones go, so that at most pipeline - ARGV[12] stay ahead
  -- (at least one when there is no room, none beyond what is over capacity when there is).
  local b = base(best)
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

local b = base(best)
redis.call('ZREM', class == 'interactive' and KEYS[1] or KEYS[2], ARGV[7])
if class == 'batch' then
  for _, i in ipairs(order) do redis.call('ZREM', KEYS[base(i) + 7], ARGV[7]) end
end
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

-- What was sent where: the prompt's blocks join the replica's index (the prefix scored a little
-- later than the tail, so that trimming takes tails first, as the engine evicts), trimmed to the
-- engine's cache size; and the choice is counted.
if nblocks > 0 then
  local args = {}
  for k = 1, nblocks do
    table.insert(args, string.format('%.6f', now - k * 1e-6))  -- tostring would keep 14 digits
    table.insert(args, ARGV[19 + k])
  end
  redis.call('ZADD', KEYS[b + 6], unpack(args))
  local size = tonumber(redis.call('HGET', KEYS[b + 1], 'kv_blocks') or '') or tonumber(ARGV[18])
  local held = redis.call('ZCARD', KEYS[b + 6])
  if held > size then redis.call('ZREMRANGEBYRANK', KEYS[b + 6], 0, held - size - 1) end
end
redis.call('HINCRBY', KEYS[b + 1], 'route_' .. reason, 1)
redis.call('HINCRBY', KEYS[b + 1], 'route_blocks', nblocks)
redis.call('HINCRBY', KEYS[b + 1], 'route_hit_blocks', hits[best] or 0)
return {best, victim, reason, hits[best] or 0}
