#!lua
-- fetch: a read that, on a miss, snapshots tag tokens and tries to take the fill lease.
-- KEYS[1]: entry, KEYS[2]: lease, KEYS[3]: wait mark, KEYS[4]: the bucket's
-- generation token, KEYS[5..]: token keys of the declared tags, then the
-- bucket's invalidation epoch (snapshot like a token).
-- ARGV[1]: token key prefix, ARGV[2]: lease token, ARGV[3]: lease ms,
-- ARGV[4]: ms a created token lives, ARGV[5]: a fresh random token.
-- Returns the payload (a string) on a hit; on a miss (foreign data under
-- the entry key counts as a miss) an array {granted, token1, token2, ...,
-- epoch, generation}. A stale entry is deleted.
-- When another caller holds the lease, the key is marked as waited for (for
-- at least as long as that lease lives), so its fill, release, set or
-- delete publishes a signal.
local state, payload = judge(ARGV[1], KEYS[1])
if state == 1 then
  return payload
end
if state == 0 then
  redis.call('DEL', KEYS[1])
end
local out = snapshot_and_lease(5, #KEYS, KEYS[4], KEYS[2], ARGV[2], ARGV[3], ARGV[4], ARGV[5])
if out[1] == 0 then
  local ms = tonumber(ARGV[3])
  local left = redis.call('PTTL', KEYS[2])
  if left > ms then
    ms = left
  end
  redis.call('SET', KEYS[3], '1', 'PX', ms)
end
return out
