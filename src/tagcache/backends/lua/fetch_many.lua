#!lua
-- fetch, for many keys of one bucket at once (concurrent fetches coalesced
-- into one call, as gets are by read.lua). Callers fetching one key with the
-- same tags form a group: a hit is judged and returned once for the group;
-- on a miss each caller gets what fetch.lua would give it, in order (the
-- first takes the lease; the others find it held and mark the key as waited
-- for, as sequential fetches would).
-- KEYS[1]: the bucket's generation token; then per group: entry, lease, wait
-- mark, the token keys of its declared tags, the bucket's invalidation epoch
-- (snapshot like a token).
-- ARGV[1]: token key prefix; then per group: the number of its tags, the
-- number of its callers, then per caller three arguments: its lease token
-- (also the fresh token of what it creates), lease ms, ms a created token
-- lives.
-- Returns one element per group: the payload (a string) on a hit, else an
-- array with, per caller, what fetch.lua returns on a miss.
local prefix, gk = ARGV[1], KEYS[1]
local out = {}
local k, a, r = 2, 2, 0
while a <= #ARGV do
  local n, c = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  local ek, lk, wk = KEYS[k], KEYS[k + 1], KEYS[k + 2]
  r = r + 1
  local state, payload = judge(prefix, ek)
  if state == 1 then
    out[r] = payload
  else
    if state == 0 then
      redis.call('DEL', ek)
    end
    local misses = {}
    for i = 1, c do
      local at = a + 2 + 3 * (i - 1)
      local lease, lease_ms = ARGV[at], ARGV[at + 1]
      local miss = snapshot_and_lease(k + 3, k + 3 + n, gk, lk, lease, lease_ms, ARGV[at + 2], lease)
      if miss[1] == 0 then
        local ms = tonumber(lease_ms)
        local left = redis.call('PTTL', lk)
        if left > ms then
          ms = left
        end
        redis.call('SET', wk, '1', 'PX', ms)
      end
      misses[i] = miss
    end
    out[r] = misses
  end
  k = k + 4 + n
  a = a + 2 + 3 * c
end
return out
