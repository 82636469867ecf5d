-- release: delete the lease at KEYS[1] only if it still holds ARGV[1].
if redis.pcall('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
