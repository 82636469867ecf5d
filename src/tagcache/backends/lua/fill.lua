-- fill: compare-and-set after a miss.
-- KEYS[1]: entry, KEYS[2]: lease, KEYS[3..2+n]: token keys.
-- ARGV[1]: payload, ARGV[2]: ttl ms ('-1' no expiry, '0' store nothing),
-- ARGV[3]: lease token, ARGV[4..3+n]: tags, ARGV[4+n..3+2n]: snapshot tokens.
-- Stores only if the lease is still ours and every token equals the
-- snapshot (a missing token is a mismatch); releases our lease either way.
-- Returns 1 if stored, else 0.
local n = #KEYS - 2
if redis.pcall('GET', KEYS[2]) ~= ARGV[3] then
  return 0
end
redis.call('DEL', KEYS[2])
local tkeys, tags, tokens = {}, {}, {}
for i = 1, n do
  local want = ARGV[3 + n + i]
  if redis.pcall('GET', KEYS[i + 2]) ~= want then
    return 0
  end
  tkeys[i] = KEYS[i + 2]
  tags[i] = ARGV[3 + i]
  tokens[i] = want
end
if ARGV[2] == '0' then
  redis.call('DEL', KEYS[1])
  return 0
end
write_entry(KEYS[1], ARGV[1], ARGV[2], tkeys, tags, tokens)
return 1
