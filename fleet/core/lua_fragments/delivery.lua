-- Whether the step record in a run hash's field is this delivery's: the commit that stored it
-- was made by this worker, at this attempt, from this start. A duplicate delivery's commit was
-- refused, so what rides on a commit (usage, fair share) must then add nothing.
local function is_this_delivery(run_key, field, worker, attempts, started_at)
  local raw = redis.call('HGET', run_key, field)
  if not raw then return false end
  local rec = cjson.decode(raw)
  return rec['worker'] == worker and tonumber(rec['attempts']) == tonumber(attempts)
    and tonumber(rec['started_at']) == tonumber(started_at)
end
