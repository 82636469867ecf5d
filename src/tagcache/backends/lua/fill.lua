-- fill: compare-and-set after a miss.
-- KEYS[1]: entry, KEYS[2]: lease, KEYS[3]: wait mark, KEYS[4..3+n]: token keys,
-- and optionally KEYS[4+n]: the bucket's invalidation epoch.
-- ARGV[1]: the namespace's signal channel, ARGV[2]: payload,
-- ARGV[3]: ttl ms ('-1' no expiry, '0' store nothing), ARGV[4]: lease token,
-- ARGV[5..4+n]: tags, ARGV[5+n..4+2n]: snapshot tokens, and with the epoch
-- key ARGV[5+2n]: the epoch at miss time.
-- Stores only if the lease is still ours, every token equals the snapshot
-- (a missing token is a mismatch) and, when given, the epoch is unchanged;
-- releases our lease either way and then signals the key's watchers, if marked.
-- Returns 1 if stored, else 0.
local with_epoch = (#ARGV - 4) % 2 == 1
local n = #KEYS - 3
if with_epoch then
  n = n - 1
end
if redis.pcall('GET', KEYS[2]) ~= ARGV[4] then
  return 0
end
redis.call('DEL', KEYS[2])

local function store()
  if with_epoch and redis.pcall('GET', KEYS[4 + n]) ~= ARGV[5 + 2 * n] then
    return 0
  end
  local tkeys, tags, tokens = {}, {}, {}
  for i = 1, n do
    local want = ARGV[4 + n + i]
    if redis.pcall('GET', KEYS[i + 3]) ~= want then
      return 0
    end
    tkeys[i] = KEYS[i + 3]
    tags[i] = ARGV[4 + i]
    tokens[i] = want
  end
  if ARGV[3] == '0' then
    redis.call('DEL', KEYS[1])
    return 0
  end
  write_entry(KEYS[1], ARGV[2], ARGV[3], tkeys, tags, tokens)
  return 1
end

local stored = store()
signal(KEYS[3], ARGV[1])
return stored
