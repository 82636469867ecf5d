-- fetch: a read that, on a miss, snapshots tag tokens and tries to take the fill lease.
-- KEYS[1]: entry, KEYS[2]: lease, KEYS[3..]: token keys of the declared tags.
-- ARGV[1]: token key prefix, ARGV[2]: lease token, ARGV[3]: lease ms,
-- ARGV[4]: ms a created token lives, ARGV[5]: a fresh random token.
-- Returns the payload (a string) on a hit; on a miss (foreign data under
-- the entry key counts as a miss) an array {granted, token1, token2, ...}.
local e = read_entry(KEYS[1])
if e and e[1] and tokens_match(ARGV[1], e[2]) then
  return e[1]
end
local px, fresh = ARGV[4], ARGV[5]
local out = {0}
for i = 3, #KEYS do
  local cur, created = current_token(KEYS[i], fresh, px)
  if not created then
    -- keep the token alive at least until the lease (and its fill) is over
    redis.call('PEXPIRE', KEYS[i], px, 'GT')
  end
  out[i - 1] = cur
end
local lease = ARGV[2]
if redis.call('SET', KEYS[2], lease, 'NX', 'PX', ARGV[3]) or redis.pcall('GET', KEYS[2]) == lease then
  out[1] = 1
end
return out
