#!lua flags=no-writes
-- peek: KEYS[1]: entry, ARGV[1]: token key prefix. Writes nothing (a stale
-- entry is reported, not deleted).
-- Returns {payload, pttl, stamp, valid (1/0)}, or nil when there is no
-- entry (or the key holds foreign data).
local state, payload, stamp = judge(ARGV[1], KEYS[1])
if state ~= 1 and state ~= 0 then
  return false
end
return {payload, redis.call('PTTL', KEYS[1]), stamp, state}
