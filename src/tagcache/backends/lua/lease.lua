#!lua
-- lease: the miss branch of fetch whether or not the entry holds a value (to
-- refresh it); never marks the key as waited for.
-- KEYS and ARGV as for fetch (KEYS[1], KEYS[3] and ARGV[1] are not used).
-- Returns {granted, token1, token2, ..., epoch, generation}.
return snapshot_and_lease(5, #KEYS, KEYS[4], KEYS[2], ARGV[2], ARGV[3], ARGV[4], ARGV[5])
