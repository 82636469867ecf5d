#!lua flags=allow-oom
-- release: delete the lease at KEYS[1] only if it still holds ARGV[1], then
-- signal the key's watchers (KEYS[2]: wait mark, ARGV[2]: channel), if marked.
-- May run when the server is out of memory: it only frees.
if redis.pcall('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  signal(KEYS[2], ARGV[2])
  return 1
end
return 0
