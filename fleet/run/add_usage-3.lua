-- Add a committed step's figures to its minute, and its tokens to its tenant's day (the tokens
-- quota, fleet.scheduling.quotas), if the commit that stored the step's record is this
-- delivery's (fleet.run.usage.UsageLedger.step_command).
-- KEYS: run hash, minute hash, the day's tokens.
-- ARGV: the step record's field, worker, attempts, started_at, TTL, tenant, tokens,
-- then field/increment pairs. Returns 1 when added.
--!include delivery.lua
if not is_this_delivery(KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4]) then return 0 end
for i = 8, #ARGV, 2 do redis.call('HINCRBYFLOAT', KEYS[2], ARGV[i], ARGV[i + 1]) end
redis.call('EXPIRE', KEYS[2], ARGV[5])
if tonumber(ARGV[7]) > 0 then
  redis.call('HINCRBY', KEYS[3], ARGV[6], ARGV[7])
  redis.call('EXPIRE', KEYS[3], 2 * 86400)
end
return 1
