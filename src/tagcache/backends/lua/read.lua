#!lua flags=allow-oom
-- get, for one or many entries of one bucket. May run when the server is out
-- of memory: it adds nothing, and deleting stale entries frees memory.
-- KEYS: entry keys. ARGV[1]: the bucket's token key prefix. ARGV[2]: if
-- given, return the result of the single key itself instead of an array.
-- Returns one element per key: the payload when every stamped token still
-- matches; nil on a miss or a stale entry; -1 when the key holds foreign data
-- (a type other than hash, or a hash that is not a well-formed entry).
-- A stale entry is deleted here, so an entry without expiry does not outlive
-- the invalidation of one of its tags.
local prefix = ARGV[1]
local out = {}
for i = 1, #KEYS do
  local state, payload = judge(prefix, KEYS[i])
  if state == 1 then
    out[i] = payload
  elseif state == 0 then
    redis.call('DEL', KEYS[i])
    out[i] = false
  elseif state == -1 then
    out[i] = -1
  else
    out[i] = false
  end
end
if ARGV[2] then
  return out[1]
end
return out
