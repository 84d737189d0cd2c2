-- Charge a committed step's model seconds over the weight to its tenant, if the commit that
-- stored the step's record is this delivery's (same worker, attempt and start).
-- KEYS: run hash, virtual times. ARGV: the step record's field, worker, attempts, started_at,
-- tenant, charge.
-- (fleet.scheduling.backlog.Backlog.charge_command)
--!include delivery.lua
if not is_this_delivery(KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4]) then return 0 end
redis.call('ZINCRBY', KEYS[2], ARGV[6], ARGV[5])
return 1
