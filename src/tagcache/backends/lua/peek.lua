-- peek: KEYS[1]: entry, ARGV[1]: token key prefix.
-- Returns {payload, pttl, tags-and-tokens, valid (1/0)}, or nil when there
-- is no entry (or the key holds foreign data).
local e = read_entry(KEYS[1])
if not e or not e[1] then
  return false
end
local t = e[2] or ''
local valid = 0
if tokens_match(ARGV[1], t) then
  valid = 1
end
return {e[1], redis.call('PTTL', KEYS[1]), t, valid}
