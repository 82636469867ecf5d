#!lua
-- fill: compare-and-set after a miss.
-- KEYS[1]: entry, KEYS[2]: lease, KEYS[3]: wait mark, KEYS[4]: the bucket's
-- generation token, KEYS[5..4+n]: token keys, and optionally KEYS[5+n]: the
-- bucket's invalidation epoch.
-- ARGV[1]: the namespace's signal channel, ARGV[2]: payload,
-- ARGV[3]: ttl ms ('-1' no expiry, '0' store nothing), ARGV[4]: lease token,
-- ARGV[5]: the generation at miss time, ARGV[6..5+n]: tags,
-- ARGV[6+n..5+2n]: snapshot tokens, and with the epoch key ARGV[6+2n]: the
-- epoch at miss time.
-- Stores only if the lease is still ours, the generation and every token
-- equal the snapshot (a missing token is a mismatch) and, when given, the
-- epoch is unchanged; releases our lease either way and then signals the
-- key's watchers, if marked.
-- Returns 1 if stored, else 0.
local with_epoch = (#ARGV - 5) % 2 == 1
local n = #KEYS - 4
if with_epoch then
  n = n - 1
end
if redis.pcall('GET', KEYS[2]) ~= ARGV[4] then
  return 0
end
redis.call('DEL', KEYS[2])

local function unchanged(k, want)
  return is_token(want) and redis.pcall('GET', k) == want
end

local function store()
  if with_epoch and not unchanged(KEYS[5 + n], ARGV[6 + 2 * n]) then
    return 0
  end
  if not unchanged(KEYS[4], ARGV[5]) then
    return 0
  end
  local tkeys, tags, tokens = {KEYS[4]}, {GEN}, {ARGV[5]}
  for i = 1, n do
    local want = ARGV[5 + n + i]
    if not unchanged(KEYS[i + 4], want) then
      return 0
    end
    tkeys[i + 1] = KEYS[i + 4]
    tags[i + 1] = ARGV[5 + i]
    tokens[i + 1] = want
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
