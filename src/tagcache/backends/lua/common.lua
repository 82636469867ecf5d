-- Helpers shared by every tagcache script. A script is sent as its own first
-- line (the Redis 7 shebang with its flags, left out for servers that reject
-- it), then these helpers, then the rest of its body.
--
-- An entry is a hash: field "p" holds the payload, field "t" its stamp: the
-- tags it carries and the token each had when the value was read, as
-- "tag1\ntoken1\ntag2\ntoken2...". The first pair is always the bucket's
-- generation (the reserved tag GEN): every entry carries it, so a server
-- restarted from disk, or a replica that took over, whose generation
-- verify.lua dropped, turns every entry written before into a miss. Tags
-- never contain control characters; tokens are hex digits and ':'. A tag's
-- token lives in the entry's bucket, at the bucket's token prefix followed by
-- the tag.
--
-- Nothing read from Redis is trusted: a key of another type, a token of
-- another shape or a stamp that is not pairs is foreign data, never a hit.

-- The reserved tag of the bucket's generation token (no user tag can contain
-- a control character).
local GEN = '\1gen'
-- The most pairs a stamp may have: far more than the generation and 128 tags
-- (64 declared and 64 from the result) tagcache writes at most.
local MAX_PAIRS = 256

-- True when v is a value tagcache writes as a token: 1 to 64 hex digits or ':'.
local function is_token(v)
  return type(v) == 'string' and #v <= 64 and string.find(v, '^[%x:]+$') ~= nil
end

-- The first 16 hex digits of the run_id of this server process (random,
-- new with every start), or nil when INFO is not available (renamed, denied
-- by an ACL, or an emulator without it), with the reason.
local function server_run_id()
  local info = redis.pcall('INFO', 'server')
  if type(info) ~= 'string' then
    return nil, tostring(type(info) == 'table' and info['err'] or info)
  end
  return string.match(info, 'run_id:(' .. string.rep('%x', 16) .. ')'), 'no run_id in INFO server'
end

-- The generation under token prefix known_prefix as read by the first stamp
-- check of this script call (the keys of one call share a bucket), false when
-- missing; nil until then, and again after the call writes it.
local known_generation, known_prefix = nil, nil

-- Check the stamp t of an entry against the current tokens (token keys are
-- prefix .. tag). Returns 1 when every stamped token, the generation first,
-- still equals its tag's current token; 0 when one does not (its tag was
-- invalidated, its token expired, was evicted or holds another type, or the
-- generation changed; also a stamp written before generations existed);
-- -1 when t is not a well-formed stamp (an odd number of parts, an empty
-- part, too many pairs).
local function check_stamp(prefix, t)
  local len = #t
  if len == 0 then
    return 0
  end
  local keys, want, n, pos, has_generation = {}, {}, 0, 1, true
  while true do
    local a = string.find(t, '\n', pos, true)
    if not a or a == pos then
      return -1
    end
    local b = string.find(t, '\n', a + 1, true)
    local stop = (b or len + 1) - 1
    if stop <= a then
      return -1
    end
    n = n + 1
    if n > MAX_PAIRS then
      return -1
    end
    if n == 1 then
      -- the first pair is the generation's (its key is prefix .. GEN)
      has_generation = string.sub(t, pos, a - 1) == GEN
    else
      keys[n] = prefix .. string.sub(t, pos, a - 1)
    end
    want[n] = string.sub(t, a + 1, stop)
    if not b then
      break
    end
    if b == len then
      return -1
    end
    pos = b + 1
  end
  if not has_generation then
    return 0
  end
  local first = 2
  if known_generation == nil or known_prefix ~= prefix then
    keys[1] = prefix .. GEN
    first = 1
  elseif want[1] ~= known_generation then
    return 0
  end
  if first > n then
    return 1
  end
  local cur = redis.call('MGET', unpack(keys, first, n))
  if first == 1 then
    known_generation, known_prefix = cur[1], prefix
  end
  for i = first, n do
    if cur[i - first + 1] ~= want[i] then
      return 0
    end
  end
  return 1
end

-- Judge the entry at ekey: returns 1, payload, stamp when it is valid;
-- 0, payload, stamp when it is stale; -1 when the key holds foreign data (a
-- type other than hash, a hash without both fields, a malformed stamp);
-- false when there is no entry.
local function judge(prefix, ekey)
  local e = redis.pcall('HMGET', ekey, 'p', 't')
  if e['err'] then
    return -1
  end
  local p, t = e[1], e[2]
  if not p or not t then
    if not p and not t then
      return false
    end
    return -1
  end
  local state = check_stamp(prefix, t)
  return state, p, t
end

-- The current token of token key k; when missing, of another type or not
-- shaped like a token it is set to fresh, with an expiry of px milliseconds
-- unless px is nil. Returns the token and whether it was created.
local function current_token(k, fresh, px)
  local cur = redis.pcall('GET', k)
  if is_token(cur) then
    return cur, false
  end
  -- SET replaces a key of any type.
  if px then
    redis.call('SET', k, fresh, 'PX', px)
  else
    redis.call('SET', k, fresh)
  end
  return fresh, true
end

-- The bucket's generation token at key k, created like a token when missing
-- but as "<run_id>:<fresh>" (the run_id shortened to 16 hex digits, or empty
-- when unknown), so that verify.lua can tell a generation this
-- server process made from one restored from disk or replicated from another
-- server. Returns the generation and whether it was created.
local function generation(k, fresh, px)
  local cur = redis.pcall('GET', k)
  if is_token(cur) then
    return cur, false
  end
  local g = (server_run_id() or '') .. ':' .. fresh
  if px then
    redis.call('SET', k, g, 'PX', px)
  else
    redis.call('SET', k, g)
  end
  known_generation = nil
  return g, true
end

-- Replace the entry at ekey, stamped with tags[i] = tokens[i] (the
-- generation first), and make the tokens (keys tkeys) outlive it. ttl is
-- milliseconds as a string, or '-1' for no expiry (then the tokens lose their
-- expiry too).
local function write_entry(ekey, payload, ttl, tkeys, tags, tokens)
  local parts = {}
  for i = 1, #tags do
    parts[2 * i - 1] = tags[i]
    parts[2 * i] = tokens[i]
  end
  redis.call('DEL', ekey)
  redis.call('HSET', ekey, 'p', payload, 't', table.concat(parts, '\n'))
  if ttl == '-1' then
    for i = 1, #tkeys do
      redis.call('PERSIST', tkeys[i])
    end
  else
    redis.call('PEXPIRE', ekey, ttl)
    local keep = tonumber(ttl) + 1000
    for i = 1, #tkeys do
      -- GT never shortens a token, and never applies to one without expiry.
      redis.call('PEXPIRE', tkeys[i], keep, 'GT')
    end
  end
end

-- Signal the watchers of a key marked as waited for: when the mark key wk
-- exists, drop it and publish its name on the namespace's channel ch. Keys
-- nobody waits for cost one DEL and publish nothing. (A mark holding foreign
-- data is dropped too; its watchers read the key again.)
local function signal(wk, ch)
  if redis.call('DEL', wk) == 1 then
    redis.call('PUBLISH', ch, wk)
  end
end

-- Try to take the fill lease at lk with token lease for lease_ms ms. Returns 1
-- when granted (free, already ours, or not a lease tagcache wrote: another
-- type, another shape, or no expiry, which a tagcache lease always has), else
-- 0 (another caller's lease).
local function take_lease(lk, lease, lease_ms)
  if redis.call('SET', lk, lease, 'NX', 'PX', lease_ms) then
    return 1
  end
  local cur = redis.pcall('GET', lk)
  if cur == lease then
    return 1
  end
  if type(cur) == 'string' and #cur == 32 and string.find(cur, '^%x+$') and redis.call('PTTL', lk) > 0 then
    return 0
  end
  redis.call('SET', lk, lease, 'PX', lease_ms)
  return 1
end

-- The miss branch of fetch: the current token of each token key
-- KEYS[first..last] (created as fresh when missing; kept alive at least px
-- ms), the bucket's generation at gk (likewise), and an attempt to take the
-- lease at lk with token lease for lease_ms ms.
-- Returns {granted (1/0), token1, token2, ..., generation}.
local function snapshot_and_lease(first, last, gk, lk, lease, lease_ms, px, fresh)
  local out = {0}
  for i = first, last do
    local cur, created = current_token(KEYS[i], fresh, px)
    if not created then
      -- keep the token alive at least until the lease (and its fill) is over
      redis.call('PEXPIRE', KEYS[i], px, 'GT')
    end
    out[i - first + 2] = cur
  end
  local g, created = generation(gk, fresh, px)
  if not created then
    redis.call('PEXPIRE', gk, px, 'GT')
  end
  out[#out + 1] = g
  out[1] = take_lease(lk, lease, lease_ms)
  return out
end
