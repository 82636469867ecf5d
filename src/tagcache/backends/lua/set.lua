-- set: store unconditionally, stamped with the current tokens; clears the lease.
-- KEYS[1]: entry, KEYS[2]: lease, KEYS[3..2+n]: token keys.
-- ARGV[1]: payload, ARGV[2]: ttl ms ('-1' no expiry, '0' store nothing),
-- ARGV[3]: a fresh random token, ARGV[4..3+n]: tags.
local ttl = ARGV[2]
redis.call('DEL', KEYS[2])
if ttl == '0' then
  redis.call('DEL', KEYS[1])
  return 0
end
local px = nil
if ttl ~= '-1' then
  px = tonumber(ttl) + 1000
end
local tkeys, tags, tokens = {}, {}, {}
for i = 1, #KEYS - 2 do
  tkeys[i] = KEYS[i + 2]
  tags[i] = ARGV[i + 3]
  tokens[i] = current_token(tkeys[i], ARGV[3], px)
end
write_entry(KEYS[1], ARGV[1], ttl, tkeys, tags, tokens)
return 1
