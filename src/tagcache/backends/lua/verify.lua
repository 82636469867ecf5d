#!lua flags=allow-oom
-- verify: run before a backend's first command and after any reconnect, for
-- each bucket it knows. Detects a server that is not the one that made the
-- bucket's generation: restarted from an RDB or AOF file, or a replica that
-- took over. Its data may lack invalidations that had already returned, so
-- the generation (which every entry carries) and the invalidation epoch are
-- dropped: every entry written before becomes a miss, and fills snapshot
-- before fail. Atomic, so of several processes only the first drops them.
-- May run when the server is out of memory: it only frees.
-- KEYS[1]: the bucket's generation token, KEYS[2]: its invalidation epoch
-- (no keys: only check that the script runs).
-- Returns 1 when it dropped them, 0 when there was nothing to do, or, when
-- the server's run_id cannot be read (INFO unavailable), the reason.
if #KEYS == 0 then
  return 0
end
local run, why = server_run_id()
if not run then
  return why
end
local g = redis.pcall('GET', KEYS[1])
if not g then
  -- No generation: no entry of the bucket can be valid, and the next write makes one.
  return 0
end
if type(g) == 'string' and string.sub(g, 1, #run + 1) == run .. ':' then
  return 0
end
redis.call('DEL', KEYS[1], KEYS[2])
return 1
