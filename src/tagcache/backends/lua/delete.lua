#!lua flags=allow-oom
-- delete: remove the entry and the lease, then signal the key's watchers, if marked.
-- May run when the server is out of memory: it only frees.
-- KEYS[1]: entry, KEYS[2]: lease, KEYS[3]: wait mark. ARGV[1]: the namespace's signal channel.
-- Returns 1 if an entry was removed, else 0.
local removed = redis.call('DEL', KEYS[1])
redis.call('DEL', KEYS[2])
signal(KEYS[3], ARGV[1])
return removed
