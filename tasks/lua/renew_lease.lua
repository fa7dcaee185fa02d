-- Renew a partition's lease if this job still holds it (or nobody does).
--
-- KEYS[1] = <ns>:{<ns>-p<P>}:lease
-- ARGV[1] = the job id   ARGV[2] = the lease's TTL (ms)
--
-- Returns 1 (renewed), or 0 and writes nothing: another job took the lease (a worker that
-- was paused must not take it back from the partition's newer job).

local holder = redis.call("GET", KEYS[1])
if holder and holder ~= ARGV[1] then
  return 0
end
redis.call("SET", KEYS[1], ARGV[1], "PX", ARGV[2])
return 1
