-- Append a run's turn to its session once (fleet.run.sessions.Sessions.append).
-- KEYS: the session's list. ARGV: run id, the turn (JSON), most turns kept, TTL (s).
for _, turn in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
  if cjson.decode(turn)['run_id'] == ARGV[1] then
    redis.call('EXPIRE', KEYS[1], ARGV[4])
    return 0
  end
end
redis.call('RPUSH', KEYS[1], ARGV[2])
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[3]), -1)
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
