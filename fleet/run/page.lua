-- The next runs of a listing (fleet.run.index.RunIndex.page): the sorted sets in KEYS merged,
-- newest first, after a position, within a time range.
-- KEYS: the sets to merge (scored by creation time; a run is in one of them at most).
-- ARGV: the position's score (the newest bound: '+inf' to start), the position's run id (''
-- to take that score's runs too), the oldest score, n.
-- Each set gives a share of n (not n each: a merge of many sets stays cheap); what comes after
-- the newest of the last entries read from sets that have more cannot be placed yet and waits
-- for the next call.
-- Returns id, score, id, score, ... (at most n runs), then 1 when no set has more in the range.
local top, after, oldest, n = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local topn = tonumber(top)
local m = math.min(n, math.max(16, math.ceil(2 * n / #KEYS)))

local function newer(a, b)  -- the listing's order: creation time, then id, both descending
  return a[3] > b[3] or (a[3] == b[3] and a[1] > b[1])
end

local found, bound, ended = {}, nil, 1
for _, key in ipairs(KEYS) do
  local got, offset, last = 0, 0, nil
  while got < m do
    local batch = redis.call('ZRANGE', key, top, oldest, 'BYSCORE', 'REV', 'LIMIT', offset, m, 'WITHSCORES')
    for i = 1, #batch, 2 do
      local id, score = batch[i], tonumber(batch[i + 1])
      -- runs of the position's own score come in descending id order: skip those not after it
      if got < m and not (after ~= '' and score == topn and id >= after) then
        last = {id, batch[i + 1], score}
        table.insert(found, last)
        got = got + 1
      end
    end
    if #batch < 2 * m then break end
    offset = offset + m
  end
  if got >= m then
    ended = 0
    if bound == nil or newer(last, bound) then bound = last end
  end
end
table.sort(found, newer)
local out = {}
for _, entry in ipairs(found) do
  if #out >= 2 * n or (bound ~= nil and newer(bound, entry)) then ended = 0 break end
  table.insert(out, entry[1])
  table.insert(out, entry[2])
end
table.insert(out, ended)
return out
