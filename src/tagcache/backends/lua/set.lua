#!lua
-- set: store unconditionally, stamped with the current tokens; clears the lease.
-- KEYS[1]: entry, KEYS[2]: lease, KEYS[3]: wait mark, KEYS[4]: the bucket's
-- generation token, KEYS[5..4+n]: token keys.
-- ARGV[1]: the namespace's signal channel, ARGV[2]: payload,
-- ARGV[3]: ttl ms ('-1' no expiry, '0' store nothing),
-- ARGV[4]: a fresh random token, ARGV[5..4+n]: tags.
-- Signals the key's watchers, if marked.
local ttl = ARGV[3]
redis.call('DEL', KEYS[2])
if ttl == '0' then
  redis.call('DEL', KEYS[1])
  signal(KEYS[3], ARGV[1])
  return 0
end
local px = nil
if ttl ~= '-1' then
  px = tonumber(ttl) + 1000
end
local tkeys, tags, tokens = {KEYS[4]}, {GEN}, {(generation(KEYS[4], ARGV[4], px))}
for i = 1, #KEYS - 4 do
  tkeys[i + 1] = KEYS[i + 4]
  tags[i + 1] = ARGV[i + 4]
  tokens[i + 1] = (current_token(KEYS[i + 4], ARGV[4], px))
end
write_entry(KEYS[1], ARGV[2], ttl, tkeys, tags, tokens)
signal(KEYS[3], ARGV[1])
return 1
