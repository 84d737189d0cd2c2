-- The next runs of a listing (fleet.run.index.RunIndex.page): the sorted sets in KEYS merged,
-- newest first, after a position, within a time range.
-- KEYS: the sets to merge (scored by creation time; a run is in one of them at most).
-- ARGV: the position's score (the newest bound: '+inf' to start), the position's run id (''
-- to take that score's runs too), the oldest score, n.
-- Returns id, score, id, score, ... (at most n runs), then 1 when no set has more in the range.
local top, after, oldest, n = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local topn = tonumber(top)
local found, ended = {}, 1
for _, key in ipairs(KEYS) do
  local got, offset = 0, 0
  while got < n do
    local batch = redis.call('ZRANGE', key, top, oldest, 'BYSCORE', 'REV', 'LIMIT', offset, n, 'WITHSCORES')
    for i = 1, #batch, 2 do
      local id, score = batch[i], tonumber(batch[i + 1])
      -- runs of the position's own score come in descending id order: skip those not after it
      if got < n and not (after ~= '' and score == topn and id >= after) then
        table.insert(found, {id, batch[i + 1], score})
        got = got + 1
      end
    end
    if #batch < 2 * n then break end
    offset = offset + n
  end
  if got >= n then ended = 0 end
end
table.sort(found, function(a, b) return a[3] > b[3] or (a[3] == b[3] and a[1] > b[1]) end)
local out = {}
for i = 1, math.min(n, #found) do
  table.insert(out, found[i][1])
  table.insert(out, found[i][2])
end
if #found > n then ended = 0 end
table.insert(out, ended)
return out
