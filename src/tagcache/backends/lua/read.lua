-- get, for one or many entries of one bucket.
-- KEYS: entry keys. ARGV[1]: the bucket's token key prefix. ARGV[2]: if
-- given, return the result of the single key itself instead of an array.
-- Returns one element per key: the payload when every stamped token still
-- matches; nil on a miss or a stale entry; -1 when the key holds foreign data
-- (a type other than hash).
local prefix = ARGV[1]
local out = {}
for i = 1, #KEYS do
  local e = read_entry(KEYS[i])
  if not e then
    out[i] = -1
  elseif e[1] and tokens_match(prefix, e[2]) then
    out[i] = e[1]
  else
    out[i] = false
  end
end
if ARGV[2] then
  return out[1]
end
return out
