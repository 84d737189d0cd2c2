-- Take n places for a tenant's runs of a class, or say which quota refuses
-- (fleet.scheduling.quotas.QuotaGate.take).
-- The places taken are also noted as the admission's claim, which it settles when its runs are
-- recorded (or gives back): a recount (fleet.scheduling.recount) counts claims beside the runs.
-- KEYS: active counts (hash), the tenant's submission bucket (hash), the day's tokens (hash),
-- the claims (hash).
-- ARGV: count field, n, active limit (-1: none), rate (-1: none), burst, now, tokens limit (-1),
-- tenant, seconds to the day's end, the claim's field.
-- Returns {1} when taken, or {0, quota, retry after (s), detail}.
local n = tonumber(ARGV[2])
local tokens_limit = tonumber(ARGV[7])
if tokens_limit >= 0 then
  local used = tonumber(redis.call('HGET', KEYS[3], ARGV[8]) or '0')
  if used >= tokens_limit then return {0, 'tokens_per_day', ARGV[9], tostring(used)} end
end
local limit = tonumber(ARGV[3])
local active = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
if active < 0 then active = 0 end
if limit >= 0 and active + n > limit then return {0, 'active', '-1', tostring(active)} end
local rate = tonumber(ARGV[4])
if rate > 0 then
  local burst, now = tonumber(ARGV[5]), tonumber(ARGV[6])
  local level = tonumber(redis.call('HGET', KEYS[2], 'level') or ARGV[5])
  local at = tonumber(redis.call('HGET', KEYS[2], 'at') or ARGV[6])
  level = math.min(burst, level + math.max(0, now - at) * rate)
  if level < n then
    return {0, 'submissions_per_s', tostring((n - level) / rate), tostring(level)}
  end
  redis.call('HSET', KEYS[2], 'level', tostring(level - n), 'at', ARGV[6])
  redis.call('EXPIRE', KEYS[2], math.ceil(burst / rate) + 60)
end
redis.call('HINCRBY', KEYS[1], ARGV[1], n)
redis.call('HINCRBY', KEYS[4], ARGV[10], n)
return {1}
