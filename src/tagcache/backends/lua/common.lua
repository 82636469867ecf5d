-- Helpers prepended to every tagcache script (one script body each).
--
-- An entry is a hash: field "p" holds the payload, field "t" the tags it
-- carries and the token each had when the value was read, as
-- "tag1\ntoken1\ntag2\ntoken2..." (tags and tokens never contain control
-- characters). A tag's token lives in the entry's bucket, at the bucket's
-- token prefix followed by the tag.

-- True when every token stamped in t still equals its tag's current token.
-- A missing token (deleted by an invalidation, expired or evicted) or one of
-- the wrong type (MGET returns nil for it) is a mismatch.
local function tokens_match(prefix, t)
  if not t or t == '' then
    return true
  end
  local keys, want, n, odd = {}, {}, 0, true
  for part in string.gmatch(t, '[^\n]+') do
    if odd then
      n = n + 1
      keys[n] = prefix .. part
    else
      want[n] = part
    end
    odd = not odd
  end
  if n == 0 then
    return true
  end
  local cur = redis.call('MGET', unpack(keys))
  for i = 1, n do
    if cur[i] ~= want[i] then
      return false
    end
  end
  return true
end

-- The current token of token key k; when missing (or not a string) it is
-- set to fresh, with an expiry of px milliseconds unless px is nil.
local function current_token(k, fresh, px)
  local ok
  if px then
    ok = redis.call('SET', k, fresh, 'NX', 'PX', px)
  else
    ok = redis.call('SET', k, fresh, 'NX')
  end
  if ok then
    return fresh, true
  end
  local cur = redis.pcall('GET', k)
  if type(cur) ~= 'string' then
    if px then
      redis.call('SET', k, fresh, 'PX', px)
    else
      redis.call('SET', k, fresh)
    end
    return fresh, true
  end
  return cur, false
end

-- Replace the entry at ekey, stamped with tags[i] = tokens[i], and make the
-- tag tokens (keys tkeys) outlive it. ttl is milliseconds as a string, or
-- '-1' for no expiry (then the tokens lose their expiry too).
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

-- Read the "p" and "t" fields of an entry; returns nil when the key holds
-- data of another type.
local function read_entry(ekey)
  local e = redis.pcall('HMGET', ekey, 'p', 't')
  if e['err'] then
    return nil
  end
  return e
end

-- Signal the watchers of a key marked as waited for: when the mark key wk
-- exists, drop it and publish its name on the namespace's channel ch. Keys
-- nobody waits for cost one DEL and publish nothing.
local function signal(wk, ch)
  if redis.call('DEL', wk) == 1 then
    redis.call('PUBLISH', ch, wk)
  end
end

-- The miss branch of fetch: the current token of each token key from
-- KEYS[first] on (created as fresh when missing; kept alive at least px ms)
-- and an attempt to take the lease at lk with token lease for lease_ms ms.
-- Returns {granted (1/0), token1, token2, ...}.
local function snapshot_and_lease(first, lk, lease, lease_ms, px, fresh)
  local out = {0}
  for i = first, #KEYS do
    local cur, created = current_token(KEYS[i], fresh, px)
    if not created then
      -- keep the token alive at least until the lease (and its fill) is over
      redis.call('PEXPIRE', KEYS[i], px, 'GT')
    end
    out[i - first + 2] = cur
  end
  if redis.call('SET', lk, lease, 'NX', 'PX', lease_ms) or redis.pcall('GET', lk) == lease then
    out[1] = 1
  end
  return out
end
